"""The ``jactus`` command line on tiny local models: calibrate, compress, merge, eval, merge-stats, help, errors.

A tiny random Llama (``tests/torch/models.py``) with a word-level tokenizer,
and a tiny ViT with an image folder, are written with ``save_pretrained``
into a temporary folder and used as the user's local Hugging Face folders.
The commands run in-process through :func:`jactus_linalg.cli.main` (the
console script and ``python -m jactus_linalg`` are checked once each, in a
subprocess).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from jactus_linalg.cli import main  # noqa: E402
from jactus_linalg.torch import CalibrationStats, load_compressed  # noqa: E402

from .numerics import tolerance  # noqa: E402
from .torch.models import tiny_llama, tiny_vit  # noqa: E402

WORDS = [f"w{i}" for i in range(90)]
SEQ_LEN = 12


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _text(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(seed=0).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text")
    paths = {"a": folder / "a.txt", "b": folder / "b.jsonl", "held": folder / "held.txt"}
    paths["a"].write_text(_text(1, 4 * 4 * SEQ_LEN))
    lines = [json.dumps({"text": _text(2 + i, 2 * SEQ_LEN)}) for i in range(8)]
    paths["b"].write_text("\n".join(lines) + "\n")
    paths["held"].write_text(_text(99, 3 * SEQ_LEN))
    return paths


@pytest.fixture(scope="module")
def llama_stats(llama_dir, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    code = main(["calibrate", str(llama_dir), "--text", str(texts["a"]), "--seq-len", str(SEQ_LEN),
                 "--samples", "16", "--batch-size", "4", "--device", "cpu", "-q", "-o", str(out)])
    assert code == 0
    return out


def test_calibrate_writes_statistics_of_every_linear_layer(llama_stats):
    stats = CalibrationStats.load(llama_stats)
    assert len(stats) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers; the head excluded
    assert stats.n_batches == 4
    layer = stats.layer("model.layers.0.self_attn.q_proj")
    assert layer.n_samples == 16 * SEQ_LEN  # every token of the 16 sequences (no padding)
    assert layer.grad_cov is not None and bool(torch.isfinite(layer.grad_cov).all())


def test_compress_then_load_and_eval(llama_dir, llama_stats, texts, tmp_path, capsys):
    out = tmp_path / "compressed"
    report = tmp_path / "report.json"
    code = main(["compress", str(llama_dir), "--stats", str(llama_stats), "--retain", "0.8", "--device", "cpu",
                 "-q", "-o", str(out), "--report", str(report)])
    assert code == 0
    model = load_compressed(out)
    dense = tiny_llama(seed=0)
    kept = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in dense.parameters())
    saved = json.loads(report.read_text())
    assert kept == pytest.approx(saved["retain_achieved"], rel=1e-12)
    assert kept <= 0.8
    assert any(layer["rank"] is not None for layer in saved["layers"])

    capsys.readouterr()
    code = main(["eval", str(out), "--tokenizer", str(llama_dir), "--text", str(texts["held"]),
                 "--seq-len", str(SEQ_LEN), "--device", "cpu", "-q"])
    assert code == 0
    compressed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert compressed["compressed"] is True and compressed["task"] == "causal-lm"
    assert compressed["tokens"] == 3 * (SEQ_LEN - 1)
    assert compressed["perplexity"] == pytest.approx(math.exp(compressed["nll"]), rel=1e-12)


def test_eval_equals_the_models_own_loss(llama_dir, texts, tmp_path, capsys):
    result_file = tmp_path / "eval.json"
    code = main(["eval", str(llama_dir), "--text", str(texts["held"]), "--seq-len", str(SEQ_LEN),
                 "--batch-size", "2", "--device", "cpu", "-q", "-o", str(result_file)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(result_file.read_text()) == printed
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(llama_dir)(texts["held"].read_text(), add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[: 3 * SEQ_LEN]).reshape(3, SEQ_LEN)
    with torch.no_grad():
        expected = float(tiny_llama(seed=0)(input_ids=batch, labels=batch).loss)  # mean over equal-length rows
    tol = 16 * torch.finfo(torch.float32).eps * math.log(96) * SEQ_LEN
    assert printed["nll"] == pytest.approx(expected, abs=tol)


def test_merge_stats_adds_up_two_calibration_runs(llama_dir, texts, llama_stats, tmp_path):
    second = tmp_path / "b.safetensors"
    merged = tmp_path / "merged.safetensors"
    assert main(["calibrate", str(llama_dir), "--text", str(texts["b"]), "--seq-len", str(SEQ_LEN),
                 "--samples", "8", "--device", "cpu", "-q", "-o", str(second)]) == 0
    assert main(["merge-stats", str(llama_stats), str(second), "-o", str(merged), "-q"]) == 0
    a, b, total = (CalibrationStats.load(p) for p in (llama_stats, second, merged))
    assert total.n_batches == a.n_batches + b.n_batches
    for name in a:
        la, lb, lt = a.layer(name), b.layer(name), total.layer(name)
        assert lt.n_samples == la.n_samples + lb.n_samples
        for field in ("input_cov", "grad_cov", "grad_mean"):
            expected = (getattr(la, field) * la.n_samples + getattr(lb, field) * lb.n_samples) / lt.n_samples
            got = getattr(lt, field)
            tol = 8 * lt.n_samples * torch.finfo(got.dtype).eps * float(expected.abs().max())
            assert float((got - expected).abs().max()) <= tol, (name, field)


def test_merge_writes_a_plain_model_that_computes_the_compressed_one(llama_dir, llama_stats, texts, tmp_path,
                                                                    capsys):
    """`jactus merge`: every factored layer multiplied out, saved with save_pretrained, read by from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jactus_linalg.torch import JactusLinear

    compressed, plain = tmp_path / "compressed", tmp_path / "plain"
    assert main(["compress", str(llama_dir), "--stats", str(llama_stats), "--retain", "0.7", "--device", "cpu",
                 "-q", "-o", str(compressed)]) == 0
    assert main(["merge", str(compressed), "--tokenizer", str(llama_dir), "-o", str(plain)]) == 0
    summary = capsys.readouterr().out
    assert f"-> {plain}" in summary and "factored layers multiplied out" in summary
    assert not (plain / "jactus.json").exists() and (plain / "config.json").is_file()
    reference = load_compressed(compressed)
    factored = [m for m in reference.modules() if isinstance(m, JactusLinear)]
    assert factored  # there was something to multiply out
    model = AutoModelForCausalLM.from_pretrained(plain, local_files_only=True)
    assert type(model) is type(reference)
    assert not any(isinstance(m, JactusLinear) for m in model.modules())
    dense = tiny_llama(seed=0)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters())
    ids = AutoTokenizer.from_pretrained(plain)(texts["held"].read_text(), add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[: 2 * SEQ_LEN]).reshape(2, SEQ_LEN)
    with torch.no_grad():
        want, got = reference(input_ids=batch).logits, model(input_ids=batch).logits
    # A C Bᵀ rounded to float32 once per weight, through the hidden width and the layers
    config = dense.config
    tol = tolerance(torch.float32, config.intermediate_size * config.num_hidden_layers) * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol
    # the merged folder is complete: `jactus eval` needs no --tokenizer
    assert main(["eval", str(plain), "--text", str(texts["held"]), "--seq-len", str(SEQ_LEN), "--device", "cpu",
                 "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["compressed"] is False and math.isfinite(result["nll"])


def _image_folder(root: Path, labels: list[str], per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    for label in labels:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / label / f"{i}.png")


def test_image_classifier_end_to_end(tmp_path, capsys):
    model_dir, images, stats, out = (tmp_path / n for n in ("vit", "images", "vit.safetensors", "vit-70"))
    vit = tiny_vit(seed=0, num_labels=3)
    vit.save_pretrained(model_dir)
    _image_folder(images, [vit.config.id2label[i] for i in range(3)], per_class=4)
    assert main(["calibrate", str(model_dir), "--images", str(images), "--samples", "12", "--device", "cpu",
                 "-q", "-o", str(stats)]) == 0
    assert main(["compress", str(model_dir), "--stats", str(stats), "--retain", "0.7", "--device", "cpu",
                 "-q", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--images", str(images), "--device", "cpu", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "image-classification" and result["images"] == 12
    assert 0 <= result["accuracy"] <= 1 and math.isfinite(result["loss"])


@pytest.mark.parametrize(("args", "expected"), [
    (["calibrate", "{missing}", "--text", "{text}", "-o", "{tmp}/s.safetensors"], "MODEL {missing} does not exist"),
    (["compress", "{llama}", "--stats", "{tmp}/none.safetensors", "-o", "{tmp}/c"], "is not a file"),
    (["compress", "{llama}", "--stats", "{stats}", "--retain", "1.5", "-q", "-o", "{tmp}/c"], "`retain`"),
    (["calibrate", "{llama}", "--images", "{tmp}", "-o", "{tmp}/s.safetensors"], "give it --text"),
    (["calibrate", "{llama}", "--text", "{text}", "--seq-len", "100000", "-o", "{tmp}/s.safetensors"],
     "fewer than one sequence"),
    (["merge-stats", "{stats}", "-o", "{tmp}/m.safetensors"], "two or more"),
    (["eval", "{compressed}", "--text", "{text}"], "pass --tokenizer"),
    (["merge", "{llama}", "-o", "{tmp}/plain"], "has nothing to merge"),
    (["merge", "{compressed}", "-o", "{llama}"], "pass a new or empty folder, or --overwrite"),
], ids=["missing-model", "missing-stats", "bad-retain", "wrong-data", "short-text", "one-file", "no-tokenizer",
        "merge-a-plain-folder", "merge-into-a-full-folder"])
def test_clear_errors(args, expected, llama_dir, llama_stats, texts, tmp_path, capsys):
    compressed = tmp_path / "compressed"
    if "{compressed}" in args:
        assert main(["compress", str(llama_dir), "--stats", str(llama_stats), "-q", "-o", str(compressed)]) == 0
    names = {"missing": str(tmp_path / "nowhere"), "text": str(texts["a"]), "tmp": str(tmp_path),
             "llama": str(llama_dir), "stats": str(llama_stats), "compressed": str(compressed)}
    capsys.readouterr()
    code = main([a.format(**names) for a in args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"jactus {args[0]}: error: ")
    assert expected.format(**names) in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "model", "-o", "s.safetensors"])  # neither --text nor --images
    assert exc.value.code == 2
    assert "one of the arguments --text --images is required" in capsys.readouterr().err
    assert main([]) == 2


def test_help_reads_like_a_man_page_and_imports_no_torch():
    probe = (
        "import sys\n"
        "from jactus_linalg import cli\n"
        "for argv in ([], ['calibrate'], ['compress'], ['merge'], ['eval'], ['merge-stats']):\n"
        "    try:\n"
        "        cli.main([*argv, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', 'TRANSFORMERS' if 'transformers' in sys.modules"
        " else 'NO TRANSFORMERS')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NO TORCH NO TRANSFORMERS")
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "EXIT STATUS", "EXAMPLES"):
        assert f"\n{section}\n" in done.stdout, section


@pytest.mark.parametrize("launcher", ["console-script", "module"])
def test_entry_points(launcher):
    if launcher == "console-script":
        script = Path(sys.executable).parent / "jactus"
        assert script.is_file(), f"{script} missing: the project is not installed (`make env`)"
        command = [str(script)]
    else:
        command = [sys.executable, "-m", "jactus_linalg"]
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("jactus ")


def test_every_command_in_the_shell_tutorial_parses():
    """Each ``jactus ...`` line of docs/tutorials/cli.md and of the help examples is a valid command line."""
    import shlex

    from jactus_linalg import cli

    page = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "cli.md"
    lines = [line.strip() for line in page.read_text(encoding="utf-8").splitlines()]
    for epilog in (cli.CALIBRATE_EPILOG, cli.COMPRESS_EPILOG, cli.MERGE_EPILOG, cli.EVAL_EPILOG,
                   cli.MERGE_STATS_EPILOG):
        lines += [line.strip() for line in epilog.splitlines()]
    commands = [line.split("#")[0] for line in lines if line.split(" ", 2)[:2] in (
        ["jactus", "calibrate"], ["jactus", "compress"], ["jactus", "merge"], ["jactus", "eval"],
        ["jactus", "merge-stats"])]
    assert len(commands) >= 12, commands
    parser = cli.build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command.replace("$MODEL", "model"))[1:])
        assert args.command in ("calibrate", "compress", "merge", "eval", "merge-stats"), command
