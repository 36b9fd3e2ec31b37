"""The runner's retain sweep decomposes each seed's base once per family, with unchanged results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.torch.models import count_plan_layer_calls, hf_loss, llama_batches, tiny_llama
from validation import run_paper
from validation.methods import Method

RETAINS = (0.6, 0.7, 0.8, 0.9)


class TinyPart:
    """What run_method reads of a part: a base model, its batches and loss, an evaluation."""

    name = "tiny"
    base_shared = False

    def __init__(self, seed: int):
        self.seed = seed
        self.head: list[str] = []
        self.base = tiny_llama(seed=seed)
        self.calibration_batches = llama_batches(n=2)
        self.tune_batches = self.calibration_batches

    def loss(self, model, batch):
        return hf_loss(model, batch)

    def evaluate_metrics(self, model, progress=False):
        return {"correct": {"t": np.ones(2, dtype=bool)}}


def _untuned(kind_options: tuple, family: str, kind: str) -> list[Method]:
    return [Method(f"{family}@{r} untuned", family, kind, r, (*kind_options, ("tune", False)))
            for r in RETAINS]


@pytest.fixture(scope="module")
def part_and_stats():
    from jactus_linalg.torch import calibrate  # noqa: PLC0415

    part = TinyPart(seed=0)
    stats = calibrate(part.base, part.calibration_batches, hf_loss, progress=False)
    return part, stats


@pytest.mark.parametrize(("kind", "options"), [("jactus", ()), ("ctf", (("compression", "svd-llm"),))])
def test_a_family_at_four_retains_decomposes_once_with_the_same_ranks(part_and_stats, monkeypatch,
                                                                       kind, options):
    part, stats = part_and_stats
    cfg = run_paper.PartConfig(lora_rank=2, damping=run_paper.DEFAULT_DAMPING)
    methods = _untuned(options, kind, kind)
    calls = count_plan_layer_calls(monkeypatch)
    swept = run_paper.SeedShare()
    swept_records = []
    for index, method in enumerate(methods):
        swept.keep_plans = {m.plan_signature() for m in methods[index + 1:]}
        swept_records.append(run_paper.run_method(part, method, cfg, stats, 0, False, swept, "k"))
        swept.release_plans()
    assert len(calls) == len(stats.layers)  # one decomposition for the four retains
    assert swept.prepared == {}  # released after the last retain
    calls.clear()
    alone = [run_paper.run_method(part, m, cfg, stats, 0, False, run_paper.SeedShare(), "k")
             for m in methods]
    assert len(calls) == len(RETAINS) * len(stats.layers)  # the old cost: one per retain
    for ours, theirs in zip(swept_records, alone, strict=True):
        assert ours["layers"] == theirs["layers"]  # ranks and predicted losses
        assert ours["retain_achieved"] == theirs["retain_achieved"]
        assert ours["total_params"] == theirs["total_params"]
        assert ours["measured_loss_increase"] == pytest.approx(theirs["measured_loss_increase"],
                                                               rel=1e-5, abs=1e-6)
    assert len({str(r["layers"]) for r in alone}) == len(RETAINS)


def test_run_part_keeps_a_decomposition_while_a_later_method_shares_it(monkeypatch, tmp_path):
    seen = []

    def fake_run_method(part, method, cfg, stats, seed, progress, shared, stats_key, save_to,
                        checkpoint=None):
        signature = method.plan_signature()
        if signature is not None:
            shared.prepared.setdefault((part.seed, stats_key, signature), object())
        seen.append((method.name, part.seed, set(shared.keep_plans),
                     {k[2] for k in shared.prepared}))
        return {"correct": {"t": [1]}, "wall_time_s": 0.0, "retain_achieved": 1.0,
                "trainable_params": 0}

    class Part:
        name = "p"

        def __init__(self, seed):
            self.seed = seed
            self.base = torch.nn.Linear(1, 1)  # on the CPU: the record keys carry no device

    monkeypatch.setattr(run_paper, "run_method", fake_run_method)
    monkeypatch.setattr(run_paper, "statistics_for", lambda *a, **k: (object(), 0.0))
    cfg = run_paper.PartConfig(retains=(0.6, 0.8), ablations=True, svd_ctf=False, base_row=False,
                               untuned_rows=False)
    preset = run_paper.presets()["smoke"]
    config = run_paper.RunConfig(preset=preset, out=Path(tmp_path))
    run_paper.run_part([Part(0), Part(1)], cfg, preset, config, False, {})
    methods = run_paper.methods_for(cfg)
    jactus = methods[2].plan_signature()  # JACTUS@0.6
    assert methods[2].name == "JACTUS@0.6"
    by_name = {}
    for name, seed, keep, held in seen:
        by_name.setdefault(name, []).append((seed, keep, held))
    # JACTUS's decomposition is kept from its first retain to the uniform ablation, its last user
    for name in ("JACTUS@0.6", "SVD-LLM+LoRA@0.6", "JACTUS@0.8", "JACTUS tau=0@0.8"):
        assert all(jactus in keep for _, keep, _ in by_name[name]), name
    assert all(jactus not in keep for _, keep, _ in by_name["JACTUS uniform@0.8"])
    # an ablation's own decomposition is used once: never kept for a later method
    tau0 = next(m for m in methods if m.name == "JACTUS tau=0@0.8").plan_signature()
    assert all(tau0 not in keep for _, keep, _ in by_name["JACTUS tau=0@0.8"])
    assert all(tau0 not in held for _, _, held in by_name["JACTUS gradient-directions@0.8"])
    # the SVD-LLM decomposition is dropped once its last retain is done
    svdllm = methods[3].plan_signature()
    assert all(svdllm not in held for _, _, held in by_name["JACTUS tau=0@0.8"])
    assert all(svdllm in held for _, _, held in by_name["JACTUS@0.8"])
