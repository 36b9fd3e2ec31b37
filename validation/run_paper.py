"""Reproduce the JACTUS paper's comparison: JACTUS vs compress-then-finetune vs LoRA/DoRA.

Usage
-----
``python validation/run_paper.py``                     the embedded default (offline, CPU, <= 30 min)
``python -m validation.run_paper``                      the same, as a module
``python validation/run_paper.py --preset full``       + language ablations and retain sweep
``python validation/run_paper.py --preset smoke``      every method on tiny models, seconds (CI)
``torchrun --nproc_per_node 8 validation/run_paper.py --preset paper --vit-checkpoint ... ``
                                                         paper scale (see ``--help`` and docs)

Each method starts from the same base model and is tuned for the same steps
on the same data in the same order with the same seed; only the learning
rate differs between trainable kinds (cores vs adapters). Results go to
``--out`` (default ``results/<preset>``): ``results.json``, ``results.csv``,
``results.md`` and PNG plots. Finished methods are kept in ``methods/`` and
skipped on a rerun with the same settings, so an interrupted run resumes.

The command line is read once, by :func:`run_config`, into a
:class:`RunConfig` (the preset with its overrides applied, the output
folder, the method filter, the paper preset's local inputs); everything
after that takes the fields it needs, never the argparse namespace. Every
model and data set is read from a local folder (``local_files_only``), so
no run touches the network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from jactus_linalg import DEFAULT_DAMPING, DEFAULT_TASK_FRACTION
from jactus_linalg.torch import CalibrationStats, calibrate
from validation.methods import Method, build_method, method_grid
from validation.report import (
    ResultRow,
    bootstrap_macro_ci,
    macro_average,
    markdown_table,
    paired_comparison,
    plot_accuracy_vs_retain,
    plot_layer_profile,
    write_results,
)
from validation.train import tune

PAPER_REPORTED = {
    "vision": {"JACTUS@0.8": 89.2, "DoRA@1.0": 87.9},
    "language": {"JACTUS@0.8": 80.9, "DoRA@1.0": 79.7},
}


@dataclass
class PartConfig:
    """Settings of one part (everything that changes a result is in here)."""

    enabled: bool = True
    model: str = "default"  # "smollm2" | "tiny" | "fmnist-vit" | "tiny-vit" | "paper"
    n_tune: int = 32
    n_test: int = 40
    batch_size: int = 8
    max_length: int = 96
    eval_batch_size: int = 32
    calibration_batches: int = 16
    steps: int = 30
    lr_core: float = 1e-3
    lr_adapter: float = 1e-3
    lora_rank: int = 8
    task_fraction: float = DEFAULT_TASK_FRACTION
    damping: float = DEFAULT_DAMPING
    retains: tuple = (0.8,)
    ablations: bool = False
    svd_ctf: bool = False
    base_row: bool = True
    probe_steps: int = 0
    probe_lr: float = 1e-2
    compress_dtype: str | None = None  # decomposition dtype; statistics stay float64
    threads: int | None = None  # torch CPU threads for this part (None: leave as is)
    keep_dense: bool = True  # JACTUS: keep layers at break-even dense (frozen) or factorize them
    untuned_rows: bool = False  # also evaluate JACTUS and SVD-LLM+LoRA right after compression


@dataclass
class Preset:
    name: str
    language: PartConfig
    vision: PartConfig
    seed: int = 0
    notes: list[str] = field(default_factory=list)


def presets() -> dict[str, Preset]:
    default = Preset(
        "default",
        language=PartConfig(model="smollm2", n_tune=32, n_test=40, steps=30,
                            calibration_batches=16, lr_core=1e-3, lr_adapter=1e-3,
                            compress_dtype="float32", keep_dense=False, untuned_rows=True),
        # learning rates and keep_dense chosen on the tune split (validation/sweep.py;
        # language: 96 dev items, keep_dense False 45.8% against True 40.6% at lr 1e-3)
        vision=PartConfig(model="fmnist-vit", n_tune=500, n_test=500, batch_size=32, steps=150,
                          calibration_batches=8, lr_core=3e-3, lr_adapter=1e-2,
                          retains=(0.6, 0.7, 0.8, 0.9), ablations=True, svd_ctf=True,
                          base_row=True, probe_steps=100, keep_dense=False, untuned_rows=True),
    )
    full = replace(
        default, name="full",
        language=replace(default.language, n_test=100, retains=(0.6, 0.7, 0.8, 0.9),
                         ablations=True, svd_ctf=True),
    )
    smoke = Preset(
        "smoke",
        language=PartConfig(model="tiny", n_tune=4, n_test=3, batch_size=8, max_length=48,
                            eval_batch_size=16, calibration_batches=2, steps=2, lora_rank=2,
                            retains=(0.6, 0.8), ablations=True, svd_ctf=True, untuned_rows=True),
        vision=PartConfig(model="tiny-vit", n_tune=64, n_test=64, batch_size=32,
                          calibration_batches=1, steps=2, lora_rank=2, retains=(0.6, 0.8),
                          ablations=True, svd_ctf=True, probe_steps=2, untuned_rows=True),
    )
    paper = Preset(
        "paper",
        language=PartConfig(model="paper", n_tune=0, n_test=0, batch_size=16, max_length=256,
                            eval_batch_size=32, calibration_batches=64, steps=3 * 170_000 // 16,
                            lr_core=2e-4, lr_adapter=2e-4, lora_rank=32),
        vision=PartConfig(model="paper", n_tune=0, n_test=0, batch_size=64,
                          calibration_batches=32, steps=5000, lr_core=1e-3, lr_adapter=1e-3,
                          lora_rank=16, probe_steps=500),
    )
    return {p.name: p for p in (default, full, smoke, paper)}


@dataclass(frozen=True)
class PaperInputs:
    """Local checkpoints and data of ``--preset paper`` (unused by the other presets)."""

    vit_checkpoint: Path | None = None
    vision_data: Path | None = None
    vision_datasets: tuple[str, ...] = ()  # empty: every dataset of paper_data.VISION_DATASETS
    llama_checkpoint: Path | None = None
    commonsense_train: Path | None = None
    commonsense_test: Path | None = None
    device: str | None = None  # None: cuda when available
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class RunConfig:
    """One run of the runner, built once from the command line by :func:`run_config`."""

    preset: Preset  # with the command-line overrides applied
    out: Path
    method_filter: tuple[str, ...] = ()  # run methods whose name contains one of these (empty: all)
    threads: int | None = None  # torch CPU threads (None: each part's own setting)
    progress: bool = True
    paper: PaperInputs = field(default_factory=PaperInputs)
    command: str = "python validation/run_paper.py"


# ----------------------------------------------------------------------------- parts


def build_language(cfg: PartConfig, seed: int, config: RunConfig) -> object:
    from validation.parts import LanguagePart  # noqa: PLC0415

    if cfg.model == "smollm2":
        from validation.assets import load_smollm2  # noqa: PLC0415

        model, tokenizer = load_smollm2()
    elif cfg.model == "tiny":
        from validation.assets import tiny_llama  # noqa: PLC0415

        model, tokenizer = tiny_llama(seed=seed)
    elif cfg.model == "paper":
        from validation.paper_data import paper_language  # noqa: PLC0415

        return [paper_language(cfg, seed, config.paper)]
    else:
        msg = f"unknown language model {cfg.model!r}"
        raise ValueError(msg)
    return [LanguagePart(
        model, tokenizer, n_tune=cfg.n_tune, n_test=cfg.n_test, seed=seed,
        batch_size=cfg.batch_size, max_length=cfg.max_length,
        calibration_batches=cfg.calibration_batches, eval_batch_size=cfg.eval_batch_size,
        settings=asdict(cfg),
    )]


def build_vision(cfg: PartConfig, seed: int, config: RunConfig) -> object:
    from validation.parts import VisionPart  # noqa: PLC0415

    if cfg.model == "paper":
        from validation.paper_data import paper_vision_parts  # noqa: PLC0415

        return paper_vision_parts(cfg, seed, config.paper, progress=config.progress)
    from validation import vision  # noqa: PLC0415

    if cfg.model == "fmnist-vit":
        model = vision.pretrained_vit(seed=seed, progress=config.progress)
    elif cfg.model == "tiny-vit":
        model = vision.tiny_pretrained_vit(seed=seed, epochs=1)
    else:
        msg = f"unknown vision model {cfg.model!r}"
        raise ValueError(msg)
    model = vision.replace_head(model, num_labels=10, seed=seed)
    task = vision.digits_task(seed=seed, n_tune=cfg.n_tune, n_test=cfg.n_test)
    return [VisionPart(
        model, task, task_name="digits", seed=seed, batch_size=cfg.batch_size,
        calibration_batches=cfg.calibration_batches, probe_steps=cfg.probe_steps,
        probe_lr=cfg.probe_lr, settings=asdict(cfg), progress=config.progress,
    )]


# ----------------------------------------------------------------------------- running


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def log(message: str) -> None:
    """Print once per run: on the main process only under torchrun."""
    if is_main_process():
        print(message, flush=True)


def this_process_batches(batches: list) -> list:
    """Under torchrun, every N-th whole batch for this process (all of them otherwise).

    ``calibrate`` all-reduces its sums, so N processes over disjoint whole
    batches give the statistics of one process over all of them. With fewer
    batches than processes every process takes them all (the means agree).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(batches)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return list(batches[rank::world]) if len(batches) >= world else list(batches)


def statistics_for(part, out: Path, key: str, progress: bool) -> tuple[CalibrationStats, float]:
    """Calibrate the part's base model once; the file lets a rerun skip it."""
    path = out / f"stats-{part.name}-{key}.safetensors"
    if path.exists():
        return CalibrationStats.load(path), 0.0
    start = time.perf_counter()
    batches = this_process_batches(part.calibration_batches)
    stats = calibrate(part.base, batches, part.loss, progress=progress, total=len(batches))
    elapsed = time.perf_counter() - start
    if is_main_process():
        stats.save(path)
    return stats, elapsed


def run_method(part, method: Method, cfg: PartConfig, stats, seed: int, progress: bool) -> dict:
    start = time.perf_counter()
    built = build_method(method, part.base, stats, head=part.head, lora_rank=cfg.lora_rank,
                         damping=cfg.damping, dtype=cfg.compress_dtype, progress=progress)
    losses: list[float] = []
    tuned = method.kind != "none" and method.opts.get("tune", True)
    if tuned:
        lr = cfg.lr_core if method.kind == "jactus" else cfg.lr_adapter
        result = tune(built.model, part.tune_batches, part.loss, steps=cfg.steps, lr=lr,
                      seed=seed, progress=progress, desc=f"{part.name}: {method.name}")
        losses = result.losses
    correct = part.evaluate(built.model, progress=progress)
    record = {
        "method": method.to_dict(),
        "correct": {t: v.astype(int).tolist() for t, v in correct.items()},
        "trainable_params": built.trainable_params if tuned else 0,
        "total_params": built.total_params,
        "retain_achieved": built.retain_achieved,
        "train_losses": losses,
        "wall_time_s": time.perf_counter() - start,
        "notes": built.notes,
    }
    if built.report is not None:
        record["layers"] = [
            {"name": r.name, "shape": list(r.shape), "rank": r.rank,
             "predicted_loss_increase": r.predicted_loss_increase}
            for r in built.report.layers
        ]
        record["predicted_loss_increase"] = built.report.total_predicted_loss_increase
    del built
    return record


def rows_from(part_name: str, records: dict, seed: int) -> list[ResultRow]:
    rows = []
    for rec in records.values():
        m = rec["method"]
        correct = {t: np.asarray(v, bool) for t, v in rec["correct"].items()}
        settings = {"family": m["family"], "kind": m["kind"], **m["options"]}
        common = dict(
            part=part_name, method=m["name"], retain_target=m["retain"],
            retain_achieved=rec["retain_achieved"], trainable_params=rec["trainable_params"],
            total_params=rec["total_params"], seed=seed, wall_time_s=rec["wall_time_s"],
            settings=settings,
        )
        for task, v in correct.items():
            rows.append(ResultRow(task=task, accuracy=float(v.mean()), n_items=int(v.size), **common))
        lo, hi = bootstrap_macro_ci(correct, seed=seed)
        rows.append(ResultRow(task="average", accuracy=macro_average(correct),
                              n_items=int(sum(v.size for v in correct.values())),
                              ci_low=lo, ci_high=hi, **common))
    return rows


def comparisons(records: dict, seed: int) -> list[dict]:
    """Paired comparisons of JACTUS against each other method at the same or full budget."""
    out = []
    by_name = {rec["method"]["name"]: rec for rec in records.values()}
    for name, rec in by_name.items():
        family = rec["method"]["family"]
        if family not in ("JACTUS", "untuned: JACTUS"):
            continue
        retain = rec["method"]["retain"]
        for other_name, other in by_name.items():
            fam = other["method"]["family"]
            same = other["method"]["retain"] == retain
            if family == "untuned: JACTUS":
                # the two compressions before any tuning step
                if not (same and fam.startswith("untuned: ") and fam != family):
                    continue
            else:
                # tuned JACTUS against the other methods at its budget, against
                # LoRA/DoRA at 100%, and against itself before tuning
                untuned_other = fam.startswith("untuned: ") and fam != "untuned: JACTUS"
                same_budget = same and fam != "JACTUS" and not untuned_other
                full = fam in ("LoRA", "DoRA") and retain == 0.8
                if not (same_budget or full):
                    continue
            a = {t: np.asarray(v, bool) for t, v in rec["correct"].items()}
            b = {t: np.asarray(v, bool) for t, v in other["correct"].items()}
            out.append({"a": name, "b": other_name, **paired_comparison(a, b, seed=seed)})
    return out


def write_outputs(out: Path, preset: Preset, all_records: dict, parts_info: dict,
                  command: str, timings: dict) -> None:
    rows: list[ResultRow] = []
    comps: dict[str, list] = {}
    for part_name, records in all_records.items():
        rows.extend(rows_from(part_name, records, preset.seed))
        comps[part_name] = comparisons(records, preset.seed)
    extra = {
        "preset": preset.name,
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
        "settings": {k: asdict(getattr(preset, k)) for k in ("language", "vision")},
        "seed": preset.seed,
        "splits": {k: v["splits"] for k, v in parts_info.items()},
        "paired_comparisons": comps,
        "timings_s": timings,
        "paper_reported": PAPER_REPORTED,
    }
    write_results(out, rows, extra)
    md = [f"# JACTUS reproduction: preset `{preset.name}`", "",
          f"Command: `{command}`  ", f"Date: {extra['date']}  ",
          f"Machine: {extra['machine']['platform']}, {extra['machine']['cpus']} CPUs, "
          f"torch {extra['machine']['torch']}", ""]
    for part_name, records in all_records.items():
        info = parts_info[part_name]
        md += [f"## {part_name}", "", markdown_table(rows, part_name, info["tasks"]), ""]
        md += _comparison_lines(comps[part_name])
        md += _paper_lines(part_name, rows)
        _plots(out, part_name, rows, records)
        md += [f"![accuracy vs retain](accuracy_vs_retain_{part_name}.png)", ""]
        if (out / f"ranks_{part_name}.png").exists():
            md += [f"![ranks](ranks_{part_name}.png)",
                   f"![predicted loss](predicted_loss_{part_name}.png)", ""]
    md += ["Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    (out / "results.md").write_text("\n".join(md))


def _comparison_lines(comps: list[dict]) -> list[str]:
    if not comps:
        return []
    lines = ["Paired comparisons on the same test items (difference of macro averages, "
             "95% paired-bootstrap CI, exact McNemar p):", ""]
    for c in comps:
        lines.append(
            f"- {c['a']} - {c['b']}: {100 * c['difference']:+.1f} points "
            f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}], p = {c['mcnemar_p']:.3g} "
            f"({c['only_a_right']} vs {c['only_b_right']} items right for one only, of {c['n_items']})"
        )
    return [*lines, ""]


def _paper_lines(part: str, rows: list[ResultRow]) -> list[str]:
    reported = PAPER_REPORTED.get(part, {})
    got = {r.method: r for r in rows if r.part == part and r.task == "average"}
    lines = ["Paper (ViT-Base / Llama2-7B) vs this run (different model and data):", ""]
    for name, value in reported.items():
        mine = got.get(name)
        lines.append(f"- {name}: paper {value:.1f}, here "
                     f"{'-' if mine is None else f'{100 * mine.accuracy:.1f}'}")
    return [*lines, ""]


def _plots(out: Path, part: str, rows: list[ResultRow], records: dict) -> None:
    plot_accuracy_vs_retain(rows, part, out / f"accuracy_vs_retain_{part}.png")
    main = [r for r in records.values()
            if r["method"]["family"] == "JACTUS" and "layers" in r]
    if not main:
        return
    rec = min(main, key=lambda r: abs(r["method"]["retain"] - 0.8))
    layers = rec["layers"]
    names = [lay["name"] for lay in layers]
    dense = [lay["rank"] is None for lay in layers]
    ranks = [min(lay["shape"]) if lay["rank"] is None else lay["rank"] for lay in layers]
    plot_layer_profile(names, ranks, dense, "rank (dense: min(m, n))",
                       f"{part}: ranks chosen by global allocation, {rec['method']['name']}",
                       out / f"ranks_{part}.png")
    plot_layer_profile(names, [lay["predicted_loss_increase"] for lay in layers], dense,
                       "predicted loss increase", f"{part}: 1/2 ||S_g^T dW S_x||^2 per layer, "
                       f"{rec['method']['name']}", out / f"predicted_loss_{part}.png", log=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python validation/run_paper.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets()), default="default")
    p.add_argument("--out", type=Path, default=None, help="results folder (default results/<preset>)")
    p.add_argument("--parts", default="language,vision", help="comma-separated parts to run")
    p.add_argument("--methods", default=None, help="only methods whose name contains one of these (comma-separated)")
    p.add_argument("--retain", type=float, nargs="+", default=None, help="override the retain sweep")
    p.add_argument("--steps", type=int, default=None, help="override tuning steps (all parts)")
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--n-tune", type=int, default=None)
    p.add_argument("--calibration-batches", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=None, help="override the LoRA/DoRA rank")
    p.add_argument("--probe-steps", type=int, default=None, help="override the vision linear-probe steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("paper preset (local paths)")
    g.add_argument("--vit-checkpoint", type=Path)
    g.add_argument("--vision-data", type=Path, help="folder with one sub-folder per dataset")
    g.add_argument("--vision-datasets", default=None, help="comma-separated dataset folder names")
    g.add_argument("--llama-checkpoint", type=Path)
    g.add_argument("--commonsense-train", type=Path, help="commonsense_170k.json")
    g.add_argument("--commonsense-test", type=Path, help="folder with <task>/test.json")
    g.add_argument("--device", default=None, help="cpu or cuda (paper preset default: cuda)")
    g.add_argument("--dtype", default="bfloat16", help="model dtype for the paper preset")
    return p


def run_config(argv: list[str] | None = None) -> RunConfig:
    """Read the command line (``sys.argv[1:]`` by default) once into a :class:`RunConfig`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    preset = configure(presets()[args.preset], args)
    paper = PaperInputs(
        vit_checkpoint=args.vit_checkpoint, vision_data=args.vision_data,
        vision_datasets=tuple(d.strip() for d in args.vision_datasets.split(",")) if args.vision_datasets else (),
        llama_checkpoint=args.llama_checkpoint, commonsense_train=args.commonsense_train,
        commonsense_test=args.commonsense_test, device=args.device, dtype=args.dtype,
    )
    return RunConfig(
        preset=preset,
        out=args.out or Path("results") / preset.name,
        method_filter=tuple(w.strip() for w in args.methods.split(",")) if args.methods else (),
        threads=args.threads,
        progress=not args.no_progress,
        paper=paper,
        command=" ".join(["python validation/run_paper.py", *argv]),
    )


def configure(preset: Preset, args: argparse.Namespace) -> Preset:
    """The preset with the command-line overrides applied (called by :func:`run_config` only)."""
    # command-line override -> PartConfig field, applied to both parts when given
    fields = {"retain": "retains", "steps": "steps", "n_test": "n_test", "n_tune": "n_tune",
              "calibration_batches": "calibration_batches", "probe_steps": "probe_steps",
              "lora_rank": "lora_rank"}
    changes = {field_name: getattr(args, arg) for arg, field_name in fields.items()
               if getattr(args, arg) is not None}
    if "retains" in changes:
        changes["retains"] = tuple(changes["retains"])

    def over(cfg: PartConfig) -> PartConfig:
        return replace(cfg, **changes)

    parts = set(args.parts.split(","))
    unknown = parts - {"language", "vision"}
    if unknown:
        msg = f"--parts: unknown part(s) {sorted(unknown)}; choose from language, vision"
        raise SystemExit(msg)
    lang = replace(over(preset.language), enabled="language" in parts)
    vis = replace(over(preset.vision), enabled="vision" in parts)
    seed = preset.seed if args.seed is None else args.seed
    return replace(preset, language=lang, vision=vis, seed=seed)


def methods_for(cfg: PartConfig, method_filter: tuple[str, ...] = ()) -> list[Method]:
    methods = method_grid(cfg.retains, ablations=cfg.ablations, base=cfg.base_row,
                          task_fraction=cfg.task_fraction, svd_ctf=cfg.svd_ctf,
                          keep_dense=cfg.keep_dense, untuned=cfg.untuned_rows)
    if method_filter:
        methods = [m for m in methods if any(w in m.name for w in method_filter)]
    return methods


def run_part(part, cfg: PartConfig, seed: int, config: RunConfig, progress: bool,
             timings: dict) -> dict[str, dict]:
    """Every method of one part; finished methods are read back instead of rerun."""
    part_key = fingerprint({"cfg": asdict(cfg), "seed": seed, "part": part.name})
    stats = None
    records: dict[str, dict] = {}
    safe = part.name.replace("/", "-")
    out = config.out
    for method in methods_for(cfg, config.method_filter):
        key = fingerprint({"part": part_key, "method": method.to_dict()})
        path = out / "methods" / f"{safe}__{method.key()}__{key}.json"
        if path.exists():
            records[method.name] = json.loads(path.read_text())
            log(f"[{part.name}] {method.name}: already done, reusing {path.name}")
            continue
        if stats is None and method.kind in ("jactus", "ctf"):
            stats, secs = statistics_for(part, out, part_key, progress)
            timings[f"{part.name}: calibration"] = secs
        rec = run_method(part, method, cfg, stats, seed, progress)
        records[method.name] = rec
        timings[f"{part.name}: {method.name}"] = rec["wall_time_s"]
        acc = macro_average({t: np.asarray(v) for t, v in rec["correct"].items()})
        log(f"[{part.name}] {method.name}: avg acc {100 * acc:.1f}%, retain "
            f"{rec['retain_achieved']:.3f}, trainable {rec['trainable_params']:,}, "
            f"{rec['wall_time_s']:.0f} s")
        if is_main_process():
            atomic_json(path, rec)
    return records


def combine_subparts(group: str, all_records: dict, parts_info: dict) -> None:
    """Merge per-dataset parts ``group/<name>`` into one ``group`` table (one task per dataset)."""
    subs = [name for name in all_records if name.startswith(group + "/")]
    if not subs:
        return
    merged: dict[str, dict] = {}
    for name in subs:
        for method, rec in all_records.pop(name).items():
            m = merged.setdefault(method, {**rec, "correct": {}, "wall_time_s": 0.0,
                                           "_n": 0, "_train": 0, "_retain": 0.0})
            m["correct"].update(rec["correct"])
            m["wall_time_s"] += rec["wall_time_s"]
            m["_n"] += 1
            m["_train"] += rec["trainable_params"]
            m["_retain"] += rec["retain_achieved"]
    for m in merged.values():
        n = m.pop("_n")
        m["trainable_params"] = m.pop("_train") // n  # mean over datasets
        m["retain_achieved"] = m.pop("_retain") / n
    all_records[group] = merged
    parts_info[group] = {
        "tasks": [name.split("/", 1)[1] for name in subs],
        "splits": {name: parts_info.pop(name)["splits"] for name in subs},
    }


def main(argv: list[str] | None = None) -> Path:
    """The command-line entry point: :func:`run` of :func:`run_config` of ``argv``."""
    # tokenizers' thread pool and torch's forked workers do not mix; set for this process only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(run_config(argv))


def run(config: RunConfig) -> Path:
    """Every enabled part of ``config.preset``; returns the results folder."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if "LOCAL_RANK" in os.environ and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    preset, out, command = config.preset, config.out, config.command
    out.mkdir(parents=True, exist_ok=True)
    progress = config.progress and is_main_process()
    all_records: dict[str, dict] = {}
    parts_info: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for group, builder in (("language", build_language), ("vision", build_vision)):
        cfg: PartConfig = getattr(preset, group)
        if not cfg.enabled:
            continue
        if cfg.threads and not config.threads:
            torch.set_num_threads(cfg.threads)
        start = time.perf_counter()
        parts = builder(cfg, preset.seed, config)
        timings[f"{group}: setup"] = time.perf_counter() - start
        for part in parts:
            records = run_part(part, cfg, preset.seed, config, progress, timings)
            all_records[part.name] = records
            parts_info[part.name] = {"tasks": part.tasks, "splits": part.split_ids}
        combine_subparts(group, all_records, parts_info)
        if is_main_process():
            write_outputs(out, preset, all_records, parts_info, command, timings)
    if is_main_process():
        write_outputs(out, preset, all_records, parts_info, command, timings)
        print(f"results in {out}/results.md", flush=True)
    return out


if __name__ == "__main__":
    main()
