"""validation.sweep_status: what a sweep's records hold so far, as the sweep would read them."""

from __future__ import annotations

import json

import pytest

from validation import sweep, sweep_status


def record(family, lr, order, score, *, target="language", steps=300, tau=None):
    rec = {"family": family, "lr": lr, "order": order, "score": score, "target": target,
           "steps": steps, "lr_head": None, "preset": "full"}
    if tau is not None:
        rec["task_fraction"] = tau
    return rec


def language_records():
    """LoRA complete on two rates (3e-3 best); DoRA with one order at one rate."""
    recs = {}
    for order, (a, b) in enumerate([(-3.44, -3.31), (-3.43, -3.32), (-3.45, -3.36)]):
        recs[f"LoRA 3e-4 {order}"] = record("LoRA", 3e-4, order, a)
        recs[f"LoRA 3e-3 {order}"] = record("LoRA", 3e-3, order, b)
    recs["DoRA 3e-4 0"] = record("DoRA", 3e-4, 0, -3.30)
    return recs


def rows_of(lines):
    """The table's body rows as lists of cells (after the summary, blank line and header)."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]


def test_a_complete_family_shows_the_rate_the_sweep_would_choose():
    recs = language_records()
    lines = sweep_status.status_table(recs, orders=3)
    assert lines[0].startswith("7 models recorded; language;")
    lora, _dora = rows_of(lines)
    chosen = sweep.select({k: v for k, v in recs.items() if v["family"] == "LoRA"}, "LoRA")
    assert chosen["lr"] == 3e-3
    assert lora[0] == "LoRA" and lora[-1] == "complete: 0.003"
    # the NLL is shown positive (the score is minus it), mean ± sample sd over the 3 orders
    assert lora[1] == "3.440 ± 0.010 (3 of 3)"
    assert lora[2] == "**3.330 ± 0.026 (3 of 3)**"


def test_a_family_still_running_has_no_choice_and_counts_its_models():
    dora = rows_of(sweep_status.status_table(language_records(), orders=3))[1]
    # one order: its score alone, no sd; a rate not run yet: "-"; nothing bold
    assert dora == ["DoRA", "3.300 (1 of 3)", "-", "1 of 6 models"]


def test_vision_counts_an_order_once_every_target_has_it():
    recs = {}
    for order in (0, 1):
        recs[f"a {order}"] = record("LoRA", 1e-2, order, 0.90, target="digits")
        recs[f"b {order}"] = record("LoRA", 1e-2, order, 0.70, target="fmnist")
    recs["a 2"] = record("LoRA", 1e-2, 2, 0.95, target="digits")  # fmnist order 2 not yet
    lines = sweep_status.status_table(recs, orders=3)
    assert "vision" in lines[0]
    (lora,) = rows_of(lines)
    # macro over the two targets (80.0%) for orders 0 and 1 only
    assert lora == ["LoRA", "80.0 ± 0.0 (2 of 3)", "2 of 3 models"]


def test_records_at_other_task_fractions_or_steps_are_never_pooled():
    recs = {f"{tau} {o}": record("JACTUS", 3e-4, o, -3.9 - tau, tau=tau)
            for tau in (0.0, 0.25) for o in range(3)}
    recs["short"] = record("LoRA", 3e-4, 0, -4.0, steps=10)
    recs["long"] = record("LoRA", 3e-4, 0, -3.5)
    names = [row[0] for row in rows_of(sweep_status.status_table(recs, orders=3))]
    assert names == ["JACTUS task_fraction=0", "JACTUS task_fraction=0.25",
                     "LoRA steps=10", "LoRA steps=300"]


def test_the_command_reads_a_folder_or_its_file_and_names_a_bad_argument(tmp_path, capsys):
    (tmp_path / "sweep.json").write_text(json.dumps(language_records()))
    by_folder = sweep_status.main([str(tmp_path)])
    assert sweep_status.main([str(tmp_path / "sweep.json")]) == by_folder
    assert "| LoRA |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not exist"):
        sweep_status.main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--orders"):
        sweep_status.main([str(tmp_path), "--orders", "0"])


def test_into_rewrites_only_the_marked_block_and_names_a_file_without_one(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n{sweep_status.BEGIN}\nold table\n{sweep_status.END}\nafter\n")
    (tmp_path / "sweep.json").write_text(json.dumps(language_records()))
    lines = sweep_status.main([str(tmp_path), "--into", str(page)])
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert sweep_status.shown_in(text) == lines
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(SystemExit, match=r"--into: .*bare\.md.*found 0"):
        sweep_status.main([str(tmp_path), "--into", str(bare)])


@pytest.mark.parametrize("shown", ["README.md", "docs/results/index.md"])
def test_the_progress_shown_is_the_committed_records(shown):
    """The README and results page show what the committed full sweep records hold."""
    records = sweep_status.load_records(sweep.ROOT / "docs/results/records/sweep-language-full")
    text = (sweep.ROOT / shown).read_text()
    assert sweep_status.shown_in(text) == sweep_status.status_table(records)
