"""Results of the paper runner: rows, confidence intervals, paired comparisons, tables and plots.

Every accuracy comes with the per-item correctness it was computed from, so
intervals and paired tests are computed from the same items:

* the average over tasks is the macro average (mean of per-task accuracies),
  as in the paper's tables;
* its 95% interval is a stratified bootstrap over test items (items resampled
  within each task);
* two methods are compared on the same items: a paired bootstrap interval of
  the difference of macro averages, and an exact McNemar test on the items
  where exactly one method is right.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ResultRow",
    "bootstrap_macro_ci",
    "macro_average",
    "markdown_table",
    "mcnemar_p",
    "paired_comparison",
    "read_results",
    "write_results",
]


@dataclass
class ResultRow:
    """One method on one task (``task="average"`` for the macro average)."""

    part: str
    method: str
    task: str
    accuracy: float
    n_items: int
    retain_target: float
    retain_achieved: float
    trainable_params: int
    total_params: int
    seed: int
    wall_time_s: float
    ci_low: float | None = None
    ci_high: float | None = None
    settings: dict = field(default_factory=dict)


def macro_average(correct: Mapping[str, np.ndarray]) -> float:
    """Mean over tasks of each task's accuracy."""
    return float(np.mean([np.mean(v) for v in correct.values()]))


def _resample_indices(correct: Mapping[str, np.ndarray], rng: np.random.Generator, n_boot: int):
    return {t: rng.integers(0, len(v), size=(n_boot, len(v))) for t, v in correct.items()}


def bootstrap_macro_ci(
    correct: Mapping[str, np.ndarray], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the macro average, resampling items within each task."""
    rng = np.random.default_rng(seed)
    idx = _resample_indices(correct, rng, n_boot)
    per_task = np.stack([np.asarray(v, float)[idx[t]].mean(axis=1) for t, v in correct.items()])
    means = per_task.mean(axis=0)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value on paired 0/1 outcomes."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def paired_comparison(
    correct_a: Mapping[str, np.ndarray],
    correct_b: Mapping[str, np.ndarray],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Difference of macro averages ``a - b`` on the same items, with a paired interval and McNemar."""
    if set(correct_a) != set(correct_b) or any(
        len(correct_a[t]) != len(correct_b[t]) for t in correct_a
    ):
        msg = "`correct_a` and `correct_b` must cover the same tasks and items"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    idx = _resample_indices(correct_a, rng, n_boot)
    diffs = np.stack(
        [
            (np.asarray(correct_a[t], float)[idx[t]] - np.asarray(correct_b[t], float)[idx[t]]).mean(axis=1)
            for t in correct_a
        ]
    ).mean(axis=0)
    flat_a = np.concatenate([correct_a[t] for t in correct_a])
    flat_b = np.concatenate([correct_b[t] for t in correct_a])
    return {
        "difference": macro_average(correct_a) - macro_average(correct_b),
        "ci_low": float(np.quantile(diffs, 0.025)),
        "ci_high": float(np.quantile(diffs, 0.975)),
        "mcnemar_p": mcnemar_p(flat_a, flat_b),
        "n_items": int(flat_a.size),
        "only_a_right": int(np.sum(flat_a.astype(bool) & ~flat_b.astype(bool))),
        "only_b_right": int(np.sum(~flat_a.astype(bool) & flat_b.astype(bool))),
    }


def write_results(out: Path, rows: Sequence[ResultRow], extra: Mapping | None = None) -> None:
    """``results.json`` (rows plus ``extra``) and ``results.csv`` (one row per method x task)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": [asdict(r) for r in rows], **(extra or {})}
    _atomic_write(out / "results.json", json.dumps(payload, indent=1, default=_jsonable))
    fields = [f for f in ResultRow.__dataclass_fields__ if f != "settings"] + ["settings"]
    tmp = out / "results.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            d = asdict(r)
            d["settings"] = json.dumps(d["settings"], sort_keys=True, default=_jsonable)
            writer.writerow(d)
    tmp.replace(out / "results.csv")


def read_results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown_table(rows: Sequence[ResultRow], part: str, tasks: Sequence[str]) -> str:
    """Paper-style table: one line per method, accuracy (%) per task, macro average with its 95% CI."""
    by_method: dict[str, dict[str, ResultRow]] = {}
    for r in rows:
        if r.part == part:
            by_method.setdefault(r.method, {})[r.task] = r
    header = "| method | retain | trainable | " + " | ".join(tasks) + " | avg (95% CI) |"
    sep = "|" + "---|" * (len(tasks) + 4)
    lines = [header, sep]
    for method, cells in by_method.items():
        avg = cells.get("average")
        if avg is None:
            continue
        accs = " | ".join(
            f"{100 * cells[t].accuracy:.1f}" if t in cells else "-" for t in tasks
        )
        ci = (
            f" ({100 * avg.ci_low:.1f}-{100 * avg.ci_high:.1f})"
            if avg.ci_low is not None and avg.ci_high is not None
            else ""
        )
        lines.append(
            f"| {method} | {avg.retain_achieved:.3f} | {avg.trainable_params:,} | {accs} | "
            f"{100 * avg.accuracy:.1f}{ci} |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_retain(rows: Sequence[ResultRow], part: str, path: Path) -> None:
    """Average accuracy against achieved retained fraction, one line per method family."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    families: dict[str, list[tuple[float, float, float, float]]] = {}
    for r in rows:
        if r.part != part or r.task != "average":
            continue
        family = r.settings.get("family", r.method)
        lo = r.ci_low if r.ci_low is not None else r.accuracy
        hi = r.ci_high if r.ci_high is not None else r.accuracy
        families.setdefault(family, []).append((r.retain_achieved, r.accuracy, lo, hi))
    for family, pts in sorted(families.items()):
        pts.sort()
        x = [p[0] for p in pts]
        y = [100 * p[1] for p in pts]
        err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=family)
    ax.set_xlabel("retained fraction of parameters (achieved)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(f"{part}: accuracy vs retained parameters (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_profile(
    names: Sequence[str], values: Sequence[float | None], dense: Sequence[int], ylabel: str,
    title: str, path: Path, *, log: bool = False,
) -> None:
    """Bar chart over layers (in model order); ``dense`` marks layers kept dense."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(max(6, 0.05 * len(names) + 4), 4))
    x = np.arange(len(names))
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    colors = ["tab:gray" if d else "tab:blue" for d in dense]
    ax.bar(x, np.nan_to_num(vals), color=colors, width=0.9)
    short = [_short(n) for n in names]
    step = max(1, len(names) // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels(short[::step], rotation=90, fontsize=6)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("  (gray: kept dense)" if any(dense) else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(name: str) -> str:
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    return (nums[0] + "." if nums else "") + parts[-1]
