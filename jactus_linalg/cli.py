"""The ``jactus`` command line: calibrate, compress, merge, evaluate, from local files.

Installed as the console script ``jactus`` (``pyproject.toml``,
``[project.scripts]``) and runnable as ``python -m jactus_linalg``. It works
on a Hugging Face causal language model or image classifier saved in a local
folder (``save_pretrained``), with calibration text or images read from
local files; nothing is downloaded. Each subcommand calls the public torch
adapter (:func:`~jactus_linalg.torch.calibrate`,
:func:`~jactus_linalg.torch.compress`, :func:`~jactus_linalg.torch.save_compressed`,
:func:`~jactus_linalg.torch.merge`, :meth:`~jactus_linalg.torch.JactusLinear.dense`,
:meth:`~jactus_linalg.torch.CalibrationStats.save`) and holds no numerics of
its own; every file it writes is written atomically.

Importing this module, or asking for ``--help``, imports neither torch nor
transformers: they are imported when a subcommand runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

PROG = "jactus"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TASKS = ("auto", "causal-lm", "image-classification")
DTYPES = ("float32", "bfloat16", "float16", "float64")

OVERVIEW = """\
NAME
    jactus - compress a Hugging Face model with JACTUS from the shell

SYNOPSIS
    jactus calibrate MODEL (--text FILE... | --images FOLDER) -o STATS.safetensors
    jactus compress  MODEL --stats STATS.safetensors -o FOLDER [--retain 0.8]
    jactus merge     FOLDER -o PLAIN_FOLDER [--tokenizer MODEL]
    jactus eval      MODEL (--text FILE... | --images FOLDER) [--tokenizer FOLDER]
    jactus merge-stats STATS.safetensors STATS.safetensors... -o STATS.safetensors

DESCRIPTION
    JACTUS compresses a pretrained model to a parameter budget with a
    projected low-rank approximation of every linear layer, measured in the
    curvature (K-FAC) norm estimated from a small calibration set.

    MODEL is a local folder written by save_pretrained (a causal LM such as
    Llama or SmolLM2, or an image classifier such as ViT), or, for `eval`, a
    folder written by `jactus compress`. Calibration text is read from plain
    text files (.txt: the whole file; .jsonl: the "text" field of each line);
    calibration images from a folder with one sub-folder per class.

    The usual sequence is: `calibrate` (statistics of the dense model),
    `compress` (ranks allocated globally, factors written), `eval` (held-out
    perplexity or accuracy of the dense and the compressed model). `merge`
    folds a compressed model's factors and cores into plain weights and
    writes an ordinary Hugging Face folder, for tools that do not know this
    package (lm-evaluation-harness, serving stacks). `merge-stats` adds up
    statistics collected in several runs on the same model.

    Run `jactus COMMAND --help` for the options of one command.

FILES
    STATS.safetensors   calibration statistics (CalibrationStats.save)
    FOLDER/jactus.json  compressed model config, with model.safetensors
                        beside it (save_compressed; load_compressed reads it)
    PLAIN_FOLDER        config.json and model.safetensors (save_pretrained):
                        the merged model, read by from_pretrained

EXIT STATUS
    0 on success, 1 when the command fails (the message says why), 2 on a
    usage error.

SEE ALSO
    docs/tutorials/cli.md (compressing SmolLM2 from the shell).
"""

CALIBRATE_EPILOG = """\
DESCRIPTION
    Runs the dense model over the calibration data and accumulates, for
    every target linear layer, the input second moment Cx, the second moment
    Cg of the per-token loss gradient at the layer's output, and the mean
    weight gradient G. The loss is the model's own: next-token cross-entropy
    for a causal LM (labels = input ids), cross-entropy of the class for an
    image classifier (the class is the image's sub-folder).

    Text files are tokenized as one stream (files joined by a blank line) and
    cut into --samples sequences of --seq-len tokens. Images are read in
    sorted order, at most --samples of them, resized to the model's input
    size (or preprocessed by the model folder's image processor).

EXAMPLES
    jactus calibrate ./SmolLM2-135M --text wiki.txt -o stats.safetensors
    jactus calibrate ./vit-base --images ./train --samples 256 -o vit.safetensors
"""

COMPRESS_EPILOG = """\
DESCRIPTION
    Loads MODEL and the statistics, compresses every target layer (greedy
    global rank allocation under one parameter budget, --retain of the whole
    model), prints the per-layer table (shape, rank or `dense`, parameters,
    predicted loss increase 1/2 ||Sg^T dW Sx||^2 in nats) and writes the
    compressed model to FOLDER with save_compressed. Layers whose factors
    would not save parameters stay dense. FOLDER must be new, empty, or
    written by an earlier `jactus compress` (--overwrite replaces any
    folder).

EXAMPLES
    jactus compress ./SmolLM2-135M --stats stats.safetensors --retain 0.8 -o smollm2-80
    jactus compress ./SmolLM2-135M --stats stats.safetensors --method svd-llm -o smollm2-svdllm
"""

MERGE_EPILOG = """\
DESCRIPTION
    Loads FOLDER (written by `jactus compress` or save_compressed), folds
    every mergeable core into its weight (jactus_linalg.torch.merge: W + A dC
    B^T) and multiplies every factored layer out into a plain nn.Linear
    (weight A C B^T, formed in at least float32 and rounded to the model's
    dtype once; JactusLinear.dense), then writes the model with
    save_pretrained. The result loads with
    AutoModelForCausalLM.from_pretrained (or AutoModelForImageClassification)
    without this package, and computes what the compressed model computes,
    up to that one rounding. It stores the dense number of parameters: keep
    FOLDER to deploy the compressed size.

    A compressed folder holds no tokenizer: pass --tokenizer with the
    original model's folder to copy its tokenizer (or image processor) in,
    so the merged folder is complete. PLAIN_FOLDER must be new or empty
    (--overwrite replaces any folder).

EXAMPLES
    jactus compress ./SmolLM2-135M --stats stats.safetensors -o smollm2-80
    jactus merge smollm2-80 --tokenizer ./SmolLM2-135M -o smollm2-80-plain
"""

MERGE_STATS_EPILOG = """\
DESCRIPTION
    Adds up calibration statistics of the same model collected in separate
    runs (other text files, other machines): the second moments, the
    gradient sums, the token and batch counts. The result is what one
    `jactus calibrate` over all the data would have collected.

EXAMPLES
    jactus calibrate ./model --text part1.txt -o s1.safetensors
    jactus calibrate ./model --text part2.txt -o s2.safetensors
    jactus merge-stats s1.safetensors s2.safetensors -o stats.safetensors
"""

EVAL_EPILOG = """\
DESCRIPTION
    Scores MODEL (a save_pretrained folder, or a folder written by `jactus
    compress`) on held-out data and prints one JSON object. Causal LM: the
    mean next-token negative log-likelihood over every predicted token
    (`nll`, nats) and `perplexity` = exp(nll). Image classifier: `accuracy`
    and the mean cross-entropy `loss`.

    A compressed folder holds no tokenizer: pass --tokenizer with the folder
    of the original model.

EXAMPLES
    jactus eval ./SmolLM2-135M --text held-out.txt
    jactus eval smollm2-80 --tokenizer ./SmolLM2-135M --text held-out.txt -o eval.json
"""


class CommandError(Exception):
    """A failure to report as ``jactus COMMAND: error: MESSAGE`` (exit status 1)."""


# ----------------------------------------------------------------------------- parser


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_data_options(p: argparse.ArgumentParser, *, samples: int) -> None:
    data = p.add_argument_group("data (one of --text, --images)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, nargs="+", metavar="FILE",
                        help="text files: .txt (whole file) or .jsonl (the \"text\" field of each line)")
    source.add_argument("--images", type=Path, metavar="FOLDER",
                        help="a folder with one sub-folder of images per class")
    data.add_argument("--samples", type=int, default=samples, metavar="N",
                      help=f"sequences (text) or images to use (default {samples})")
    data.add_argument("--seq-len", type=int, default=256, metavar="L",
                      help="tokens per text sequence (default 256)")
    data.add_argument("--batch-size", type=int, default=4, metavar="B",
                      help="sequences or images per batch (default 4)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--task", choices=TASKS, default="auto",
                       help="what MODEL is (default: read from its config.json `architectures`)")
    model.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="load the model in this dtype (default float32)")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def _subcommand(sub, name: str, *, summary: str, description: str, epilog: str, run,
                model: str | None, output: tuple[str, str, bool], quiet: str) -> argparse.ArgumentParser:
    """One subcommand with what every command shares: the MODEL argument, ``-o`` and ``-q``."""
    p = sub.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=_formatter)
    if model is not None:
        p.add_argument("model", type=Path, metavar="MODEL" if name != "merge" else "FOLDER", help=model)
    metavar, help_text, required = output
    p.add_argument("-o", "--output", type=Path, required=required, default=None, metavar=metavar, help=help_text)
    p.add_argument("-q", "--quiet", action="store_true", help=quiet)
    p.set_defaults(run=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``jactus`` parser with its subcommands (nothing heavy is imported)."""
    parser = argparse.ArgumentParser(prog=PROG, description=OVERVIEW, formatter_class=_formatter,
                                     usage="%(prog)s [-h] [--version] COMMAND ...")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    stats_file = "STATS.safetensors"

    cal = _subcommand(
        sub, "calibrate", summary="collect calibration statistics of a dense model",
        description="Collect the calibration statistics (Cx, Cg, G) of every target linear layer.",
        epilog=CALIBRATE_EPILOG, run=cmd_calibrate, model="a save_pretrained folder",
        output=(stats_file, "where to write the statistics", True), quiet="no progress bars or summary")
    _add_data_options(cal, samples=128)
    _add_model_options(cal)
    cal.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                     help="layers to calibrate: names or one regex (default: every linear layer but the output head)")
    cal.add_argument("--exclude", nargs="+", default=None, metavar="NAME", help="layers to leave out")

    com = _subcommand(
        sub, "compress", summary="compress a model to a parameter budget and save it",
        description="Compress MODEL with its calibration statistics and save the result.",
        epilog=COMPRESS_EPILOG, run=cmd_compress, model="the save_pretrained folder that was calibrated",
        output=("FOLDER", "where to write the compressed model", True), quiet="no progress bars or table")
    com.add_argument("--stats", type=Path, required=True, metavar=stats_file,
                     help="statistics from `jactus calibrate` (or `jactus merge-stats`)")
    how = com.add_argument_group("compression (JactusConfig fields)")
    how.add_argument("--retain", type=float, default=0.8, help="parameters after / before, whole model (default 0.8)")
    how.add_argument("--method", choices=("jactus", "kfac", "svd-llm", "svd"), default="jactus",
                     help="jactus (default), kfac (two-sided whitening), svd-llm (input whitening), svd")
    how.add_argument("--task-fraction", type=float, default=None, metavar="TAU",
                     help="share of each layer's rank spent on task directions (jactus; default the package's)")
    how.add_argument("--damping", type=float, default=None,
                     help="relative damping of the covariances (default: the method's)")
    how.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                     help="layers to compress, among the calibrated ones (default: all of them)")
    how.add_argument("--exclude-modules", nargs="+", default=None, metavar="NAME", help="layers to leave dense")
    how.add_argument("--allocation", choices=("global", "uniform"), default="global",
                     help="global greedy allocation (default) or the same fraction in every layer")
    how.add_argument("--decompose-dtype", choices=("float32", "float64"), default=None,
                     help="dtype of the decompositions (default: the statistics')")
    _add_model_options(com)
    com.add_argument("--report", type=Path, default=None, metavar="FILE.json", help="also write the report as JSON")
    com.add_argument("--overwrite", action="store_true",
                     help="replace FOLDER even if it holds files `jactus compress` did not write")

    mer = _subcommand(
        sub, "merge", summary="fold a compressed model into plain weights (a from_pretrained folder)",
        description="Fold the factors and cores of a compressed model into plain nn.Linear weights and "
                    "save it with save_pretrained.",
        epilog=MERGE_EPILOG, run=cmd_merge, model="a folder written by `jactus compress` (save_compressed)",
        output=("PLAIN_FOLDER", "where to write the merged model", True), quiet="no summary")
    mer.add_argument("--tokenizer", type=Path, default=None, metavar="MODEL",
                     help="copy the tokenizer or image processor of this folder (the original model) in")
    mer.add_argument("--dtype", choices=DTYPES, default=None,
                     help="save the merged weights in this dtype (default: the compressed model's)")
    mer.add_argument("--overwrite", action="store_true", help="replace PLAIN_FOLDER even if it holds files")

    ev = _subcommand(
        sub, "eval", summary="held-out perplexity or accuracy of a model",
        description="Score MODEL on held-out text (perplexity) or images (accuracy).",
        epilog=EVAL_EPILOG, run=cmd_eval, model="a save_pretrained folder or a `jactus compress` folder",
        output=("FILE.json", "also write the result here", False), quiet="no progress bars")
    ev.add_argument("--tokenizer", type=Path, default=None, metavar="FOLDER",
                    help="folder with the tokenizer or image processor (default MODEL; "
                         "needed for a compressed language model)")
    _add_data_options(ev, samples=64)
    _add_model_options(ev)

    ms = _subcommand(
        sub, "merge-stats", summary="add up statistics from several calibration runs",
        description="Add up calibration statistics of one model collected in several runs.",
        epilog=MERGE_STATS_EPILOG, run=cmd_merge_stats, model=None,
        output=(stats_file, "where to write the sum", True), quiet="no summary")
    ms.add_argument("inputs", type=Path, nargs="+", metavar=stats_file, help="two or more statistics files")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("jactus_linalg")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jactus`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    for name in ("samples", "seq_len", "batch_size"):
        if getattr(args, name, 1) < 1:
            parser.error(f"{args.command}: --{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if getattr(args, "quiet", False):
        _silence_library_progress()
    try:
        args.run(args)
    except (CommandError, ValueError, TypeError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _silence_library_progress() -> None:
    """``--quiet``: no transformers progress bars (loading and saving weights) either."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- models


@dataclass
class Loaded:
    """A model ready to run, and how to feed it."""

    model: Any
    task: str  # "causal-lm" | "image-classification"
    folder: Path
    compressed: bool


def _require_folder(path: Path, what: str) -> Path:
    if not path.exists():
        msg = f"{what} {path} does not exist"
        raise CommandError(msg)
    if not path.is_dir():
        msg = f"{what} {path} is a file; expected a folder written by save_pretrained"
        raise CommandError(msg)
    return path


def _task_of(architectures: Sequence[str] | None, requested: str, folder: Path) -> str:
    if requested != "auto":
        return requested
    names = list(architectures or [])
    if any(n.endswith("ForCausalLM") for n in names):
        return "causal-lm"
    if any(n.endswith("ForImageClassification") for n in names):
        return "image-classification"
    msg = (
        f"MODEL {folder}: cannot tell a causal LM from an image classifier (config.json "
        f"`architectures` = {names}); pass --task causal-lm or --task image-classification"
    )
    raise CommandError(msg)


def _device(name: str | None):
    import torch  # noqa: PLC0415

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        msg = f"--device {name!r} is not a device ({err})"
        raise CommandError(msg) from err


def load_model(folder: Path, *, task: str = "auto", dtype: str = "float32", device: str | None = None) -> Loaded:
    """A dense ``save_pretrained`` folder, or a folder written by ``save_compressed``."""
    import torch  # noqa: PLC0415

    _require_folder(folder, "MODEL")
    if (folder / "jactus.json").is_file():
        from jactus_linalg.torch import load_compressed  # noqa: PLC0415

        model = load_compressed(folder)
        architectures = [type(model).__name__]
        compressed = True
    else:
        if not (folder / "config.json").is_file():
            msg = f"MODEL {folder} has no config.json: not a save_pretrained folder (nor a `jactus compress` one)"
            raise CommandError(msg)
        config = json.loads((folder / "config.json").read_text())
        kind = _task_of(config.get("architectures"), task, folder)
        from transformers import AutoModelForCausalLM, AutoModelForImageClassification  # noqa: PLC0415

        auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForImageClassification
        model = auto.from_pretrained(folder, local_files_only=True, dtype=getattr(torch, dtype))
        architectures = [type(model).__name__]
        compressed = False
    kind = _task_of(architectures, task, folder)
    model = model.to(_device(device)).eval()
    return Loaded(model, kind, folder, compressed)


# ----------------------------------------------------------------------------- data


def read_texts(files: Sequence[Path]) -> str:
    """The text of every file, joined by a blank line (.jsonl: the ``"text"`` field of each line)."""
    parts = []
    for path in files:
        if not path.is_file():
            msg = f"--text {path} is not a file"
            raise CommandError(msg)
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for number, line in enumerate(raw.splitlines(), start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    msg = f"--text {path}: line {number} is not a JSON object with a string \"text\" field"
                    raise CommandError(msg)
                parts.append(record["text"])
        else:
            parts.append(raw)
    text = "\n\n".join(p for p in parts if p.strip())
    if not text:
        msg = f"--text {', '.join(map(str, files))}: no text"
        raise CommandError(msg)
    return text


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        msg = (
            f"no tokenizer in {folder} ({type(err).__name__}); a folder written by `jactus compress` "
            "holds none: pass --tokenizer with the original model's folder"
        )
        raise CommandError(msg) from err


def text_batches(tokenizer, text: str, *, seq_len: int, samples: int, batch_size: int) -> list[dict]:
    """Non-overlapping ``seq_len``-token sequences of the tokenized text, ``batch_size`` per batch."""
    import torch  # noqa: PLC0415

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        msg = f"--text holds {len(ids)} tokens, fewer than one sequence of --seq-len {seq_len}"
        raise CommandError(msg)
    seqs = torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
        for chunk in seqs.split(batch_size)
    ]


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        msg = f"--images {root} is not a folder"
        raise CommandError(msg)
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        msg = f"--images {root} has no class sub-folders (expected FOLDER/<class>/<image>)"
        raise CommandError(msg)
    return classes


def _label_ids(classes: Sequence[str], config) -> dict[str, int]:
    """Class folder name -> label id: the model's ``label2id`` if it names every folder, else sorted order."""
    label2id = dict(getattr(config, "label2id", None) or {})
    if all(c in label2id for c in classes):
        return {c: int(label2id[c]) for c in classes}
    num_labels = int(getattr(config, "num_labels", 0))
    if len(classes) > num_labels:
        msg = (
            f"--images has {len(classes)} class folders but the model has {num_labels} labels, and its "
            f"label2id names none of {list(classes)[:4]}; use one folder per label, named as in label2id"
        )
        raise CommandError(msg)
    return {c: i for i, c in enumerate(classes)}


def _pixels(images, model, folder: Path):
    import torch  # noqa: PLC0415

    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor  # noqa: PLC0415

        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        return processor(images=images, return_tensors="pt")["pixel_values"]
    config = model.config
    size = int(config.image_size)
    mode = "L" if int(getattr(config, "num_channels", 3)) == 1 else "RGB"
    arrays = [torch.frombuffer(bytearray(im.convert(mode).resize((size, size)).tobytes()), dtype=torch.uint8)
              for im in images]
    x = torch.stack(arrays).reshape(len(images), size, size, -1).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.5  # the ViT image processor's default mean and std


def image_batches(model, root: Path, *, samples: int, batch_size: int, model_folder: Path) -> list[dict]:
    """Up to ``samples`` images (sorted by class, then name), labelled by their class folder."""
    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    classes = _class_folders(root)
    ids = _label_ids([c.name for c in classes], model.config)
    files = [(f, ids[c.name]) for c in classes for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        msg = f"--images {root} holds no image ({', '.join(IMAGE_SUFFIXES)}) in its class folders"
        raise CommandError(msg)
    files = files[:samples]
    dtype = next(model.parameters()).dtype
    batches = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = []
        for path, _ in chunk:
            with Image.open(path) as im:
                images.append(im.copy())
        pixels = _pixels(images, model, model_folder).to(dtype)
        batches.append({"pixel_values": pixels, "labels": torch.tensor([label for _, label in chunk])})
    return batches


def batches_for(loaded: Loaded, args, *, tokenizer_folder: Path | None = None) -> list[dict]:
    if loaded.task == "causal-lm":
        if args.images is not None:
            msg = f"MODEL {loaded.folder} is a causal LM: give it --text, not --images"
            raise CommandError(msg)
        tokenizer = load_tokenizer(tokenizer_folder or loaded.folder)
        return text_batches(tokenizer, read_texts(args.text), seq_len=args.seq_len, samples=args.samples,
                            batch_size=args.batch_size)
    if args.text is not None:
        msg = f"MODEL {loaded.folder} is an image classifier: give it --images, not --text"
        raise CommandError(msg)
    return image_batches(loaded.model, args.images, samples=args.samples, batch_size=args.batch_size,
                         model_folder=tokenizer_folder or loaded.folder)


def _on(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def hf_loss(model, batch: dict):
    """The model's own training loss (``model(**batch).loss``), on the model's device."""
    return model(**_on(batch, next(model.parameters()).device)).loss


# ----------------------------------------------------------------------------- commands


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, flush=True)


def _write_json(path: Path, payload: dict) -> None:
    from jactus_linalg._files import atomic_write  # noqa: PLC0415

    text = json.dumps(payload, indent=1, default=str) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write, name="--output")


def cmd_calibrate(args) -> None:
    from jactus_linalg.torch import calibrate  # noqa: PLC0415

    loaded = load_model(args.model, task=args.task, dtype=args.dtype, device=args.device)
    if loaded.compressed:
        msg = f"MODEL {args.model} is already compressed; calibrate the dense model it came from"
        raise CommandError(msg)
    batches = batches_for(loaded, args)
    targets = _pattern(args.targets) or "all-linear"
    stats = calibrate(loaded.model, batches, hf_loss, targets=targets, exclude=_pattern(args.exclude),
                      progress=not args.quiet, total=len(batches))
    path = stats.save(args.output)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else len(b["labels"]) for b in batches)
    unit = "tokens" if loaded.task == "causal-lm" else "images"
    _say(args, f"{len(stats)} layers, {tokens} {unit} in {len(batches)} batches -> {path}")


def _pattern(names: Sequence[str] | None) -> str | list[str] | None:
    """One name or regex stays a string (PEFT-style); several are a list of names."""
    if not names:
        return None
    return names[0] if len(names) == 1 else list(names)


def cmd_compress(args) -> None:
    from jactus_linalg.torch import CalibrationStats, JactusConfig, compress, save_compressed  # noqa: PLC0415

    if not args.stats.is_file():
        msg = f"--stats {args.stats} is not a file; write one with `jactus calibrate`"
        raise CommandError(msg)
    loaded = load_model(args.model, task=args.task, dtype=args.dtype, device=args.device)
    if loaded.compressed:
        msg = f"MODEL {args.model} is already compressed; compress the dense model"
        raise CommandError(msg)
    stats = CalibrationStats.load(args.stats)
    fields: dict[str, Any] = {
        "retain": args.retain, "method": args.method, "allocation": args.allocation,
        # nothing is tuned here: layers kept dense stay plain (no mergeable core to fold)
        "dense_cores": False, "trainable": "none",
    }
    optional = {"task_fraction": args.task_fraction, "damping": args.damping, "dtype": args.decompose_dtype,
                "target_modules": _pattern(args.target_modules),
                "exclude_modules": _pattern(args.exclude_modules)}
    fields.update({k: v for k, v in optional.items() if v is not None})
    config = JactusConfig(**fields)
    report = compress(loaded.model, stats, config, progress=not args.quiet)
    _say(args, report.table())
    folder = save_compressed(loaded.model, args.output, overwrite=args.overwrite)
    if args.report is not None:
        _write_json(args.report, report.to_dict())
    _say(args, f"compressed model -> {folder} (load it with jactus_linalg.torch.load_compressed)")


def merge_statistics(parts: Sequence[Any]):
    """The sum of calibration statistics of one model (:class:`~jactus_linalg.torch.CalibrationStats`)."""
    from jactus_linalg.torch import CalibrationStats  # noqa: PLC0415

    first = parts[0]
    for i, other in enumerate(parts[1:], start=2):
        if other.layers != first.layers:
            msg = (
                f"statistics file {i} describes other layers than file 1 (layers or shapes differ): "
                "merge statistics of the same model and targets only"
            )
            raise CommandError(msg)
        if set(other.grads) != set(first.grads) or set(other.grad_sums) != set(first.grad_sums):
            msg = f"statistics file {i} holds gradients for other layers than file 1"
            raise CommandError(msg)
    total = CalibrationStats(layers=dict(first.layers), meta=dict(first.meta))
    total.inputs = {k: _merged([p.inputs[k] for p in parts]) for k in first.inputs}
    total.grads = {k: _merged([p.grads[k] for p in parts]) for k in first.grads}
    total.grad_sums = {k: sum((p.grad_sums[k] for p in parts[1:]), first.grad_sums[k].clone())
                       for k in first.grad_sums}
    total.n_batches = sum(p.n_batches for p in parts)
    return total


def _merged(accumulators: Sequence[Any]):
    out = accumulators[0]
    for acc in accumulators[1:]:
        out = out.merge(acc)
    return out


def cmd_merge_stats(args) -> None:
    from jactus_linalg.torch import CalibrationStats  # noqa: PLC0415

    if len(args.inputs) < 2:
        msg = f"give two or more statistics files to merge; got {len(args.inputs)}"
        raise CommandError(msg)
    parts = []
    for path in args.inputs:
        if not path.is_file():
            msg = f"statistics file {path} does not exist"
            raise CommandError(msg)
        parts.append(CalibrationStats.load(path))
    total = merge_statistics(parts)
    path = total.save(args.output)
    _say(args, f"{len(parts)} files, {total.n_batches} batches, {len(total)} layers -> {path}")


def _check_new_folder(folder: Path, *, overwrite: bool) -> None:
    """``-o`` of `jactus merge`: a new or empty folder, or any folder with --overwrite (never the cwd)."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        msg = f"--output {folder} is {'a symbolic link' if folder.is_symlink() else 'a file'}; pass a new folder"
        raise CommandError(msg)
    if not folder.exists():
        return
    resolved, cwd = folder.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        msg = f"--output {folder} is the working directory or one of its parents; pass a new folder"
        raise CommandError(msg)
    entries = sorted(p.name for p in folder.iterdir())
    if entries and not overwrite:
        msg = (f"--output {folder} holds {len(entries)} entries (e.g. {entries[:3]}); pass a new or empty "
               "folder, or --overwrite to replace the whole folder")
        raise CommandError(msg)


def merged_model(model):
    """``model`` with every mergeable core folded in and every factored layer multiplied out, in place.

    Returns ``(model, factored)``: the model, now built of plain ``nn.Linear``
    layers, and the names of the layers that were factored.
    """
    from jactus_linalg.torch import JactusLinear, merge  # noqa: PLC0415

    merge(model)  # W + A dC B^T for every layer kept dense with a core
    factored = [name for name, mod in model.named_modules() if isinstance(mod, JactusLinear)]
    for name in factored:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).dense())
    return model, factored


def cmd_merge(args) -> None:
    import torch  # noqa: PLC0415

    from jactus_linalg._files import replace_folder  # noqa: PLC0415

    folder = _require_folder(args.model, "FOLDER")
    if not (folder / "jactus.json").is_file():
        msg = (f"FOLDER {folder} has no jactus.json: not written by `jactus compress`; a save_pretrained "
               "folder is already plain and has nothing to merge")
        raise CommandError(msg)
    _check_new_folder(args.output, overwrite=args.overwrite)
    if args.tokenizer is not None:
        _require_folder(args.tokenizer, "--tokenizer")
    loaded = load_model(folder, device="cpu")
    stored = sum(p.numel() for p in loaded.model.parameters())
    model, factored = merged_model(loaded.model)
    if args.dtype is not None:
        model = model.to(getattr(torch, args.dtype))
    if hasattr(model, "jactus_config"):
        del model.jactus_config
    processor = None
    if args.tokenizer is not None:
        if loaded.task == "causal-lm":
            processor = load_tokenizer(args.tokenizer)
        elif (args.tokenizer / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor  # noqa: PLC0415

            processor = AutoImageProcessor.from_pretrained(args.tokenizer, local_files_only=True)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)

    out = replace_folder(args.output, fill)
    dense = sum(p.numel() for p in model.parameters())
    _say(args, f"{len(factored)} factored layers multiplied out ({stored} -> {dense} parameters stored) -> {out} "
               "(load it with from_pretrained)")


def evaluate(loaded: Loaded, batches: Sequence[dict], *, progress: bool = True) -> dict[str, float | int]:
    """Mean next-token NLL and perplexity (causal LM), or accuracy and mean loss (image classifier)."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    model = loaded.model
    device = next(model.parameters()).device
    total_loss, count, correct = 0.0, 0, 0
    with torch.inference_mode():
        for batch in tqdm(batches, desc="evaluating", disable=not progress, leave=False):
            batch = _on(batch, device)
            if loaded.task == "causal-lm":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                target = batch["input_ids"][:, 1:]
                keep = batch["attention_mask"][:, 1:].bool()
                nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")
                total_loss += float(nll[keep].double().sum())
                count += int(keep.sum())
            else:
                logits = model(pixel_values=batch["pixel_values"]).logits.float()
                total_loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
                count += len(batch["labels"])
    mean = total_loss / count
    if loaded.task == "causal-lm":
        return {"nll": mean, "perplexity": math.exp(mean), "tokens": count}
    return {"accuracy": correct / count, "loss": mean, "images": count}


def cmd_eval(args) -> None:
    loaded = load_model(args.model, task=args.task, dtype=args.dtype, device=args.device)
    batches = batches_for(loaded, args, tokenizer_folder=args.tokenizer)
    result: dict[str, Any] = {"model": str(args.model), "compressed": loaded.compressed, "task": loaded.task}
    result.update(evaluate(loaded, batches, progress=not args.quiet))
    print(json.dumps(result), flush=True)
    if args.output is not None:
        _write_json(args.output, result)

