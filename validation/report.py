"""Results of the paper runner: rows, confidence intervals, paired comparisons, tables and plots.

Every accuracy comes with the per-item correctness it was computed from, so
intervals and paired tests are computed from the same items:

* the average over tasks is the macro average (mean of per-task accuracies),
  as in the paper's tables;
* its 95% interval is a stratified bootstrap over test items (items resampled
  within each task);
* two methods are compared on the same items: a paired bootstrap interval of
  the difference of macro averages, and an exact McNemar test on the items
  where exactly one method is right. With several seeds the items of every
  seed are pooled (each test item once per seed), so the interval covers
  both the choice of items and the seed;
* over seeds, tables show the mean and the sample sd of each seed's macro
  average (:func:`summarize`, :func:`seed_table`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jactus_linalg._files import atomic_write

__all__ = [
    "ResultRow",
    "bootstrap_macro_ci",
    "claim_lines",
    "macro_average",
    "markdown_table",
    "mcnemar_p",
    "metrics_table",
    "paired_comparison",
    "plot_dev_sweep",
    "plot_predicted_vs_measured",
    "read_results",
    "seed_table",
    "summarize",
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
    write_text_atomic(out / "results.json", json.dumps(payload, indent=1, default=_jsonable))
    fields = [f for f in ResultRow.__dataclass_fields__ if f != "settings"] + ["settings"]

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                d = asdict(r)
                d["settings"] = json.dumps(d["settings"], sort_keys=True, default=_jsonable)
                writer.writerow(d)

    atomic_write(out / "results.csv", write_csv)


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


def write_text_atomic(path: Path, text: str) -> None:
    """Create or replace the text file ``path`` atomically (the package's :func:`atomic_write`)."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


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


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (0 for a single value)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


#: Language metrics besides the accuracy: macro mean over tasks of per-item values.
METRIC_LABELS = {"acc": "acc (%)", "correct": "acc_norm (%)", "answer_nll": "answer NLL (nats/token)",
                 "margin": "margin (nats/token)"}


def summarize(records_by_seed: Mapping) -> dict[str, dict]:
    """Per method, over seeds: macro-average accuracy (mean, sd), per task means, extra metrics.

    ``records_by_seed`` is ``{seed: {method: record}}`` as the runner keeps
    them (``record["correct"]``: per task one 0/1 per item; ``record["metrics"]``:
    per metric and task one value per item). ``without_<task>`` is the macro
    average leaving that task out (``without_boolq`` for language).
    """
    per_method: dict[str, list] = {}
    for recs in records_by_seed.values():
        for name, rec in recs.items():
            per_method.setdefault(name, []).append(rec)
    out: dict[str, dict] = {}
    for name, recs in per_method.items():
        m = recs[0]["method"]
        accs = [macro_average({t: np.asarray(v, float) for t, v in r["correct"].items()}) for r in recs]
        mean, sd = _mean_sd(accs)
        tasks = list(recs[0]["correct"])
        entry = {
            "family": m["family"], "kind": m["kind"], "retain": m["retain"],
            "retain_achieved": float(np.mean([r["retain_achieved"] for r in recs])),
            "trainable_params": int(np.mean([r["trainable_params"] for r in recs])),
            "mean": mean, "sd": sd, "per_seed": accs, "n_seeds": len(recs),
            "tasks": {t: _mean_sd([np.mean(r["correct"][t]) for r in recs])[0] for t in tasks},
        }
        if len(tasks) > 2 and "boolq" in tasks:
            rest = [macro_average({t: np.asarray(v, float) for t, v in r["correct"].items()
                                   if t != "boolq"}) for r in recs]
            entry["without_boolq"] = dict(zip(("mean", "sd"), _mean_sd(rest), strict=True))
        metrics: dict[str, dict] = {}
        for metric in ("acc", "answer_nll", "margin"):
            if all(metric in r.get("metrics", {}) for r in recs):
                vals = [float(np.mean([np.mean(v) for v in r["metrics"][metric].values()]))
                        for r in recs]
                metrics[metric] = dict(zip(("mean", "sd"), _mean_sd(vals), strict=True))
        if metrics:
            metrics["correct"] = {"mean": mean, "sd": sd}
        entry["metrics"] = metrics
        out[name] = entry
    return out


def seed_table(summary: Mapping[str, dict], tasks: Sequence[str], *, without: str | None = None) -> str:
    """One line per method: per task mean accuracy (%), macro average mean ± sd over seeds.

    With ``without`` among ``tasks`` (and more than two tasks) a column gives
    the average without that task.
    """
    extra = without is not None and without in tasks and len(tasks) > 2
    header = ("| method | retain | trainable | " + " | ".join(tasks) + " | avg ± sd (seeds)"
              + (f" | avg w/o {without}" if extra else "") + " |")
    sep = "|" + "---|" * (len(tasks) + 4 + extra)
    lines = [header, sep]
    for name, e in summary.items():
        cells = " | ".join(f"{100 * e['tasks'][t]:.1f}" if t in e["tasks"] else "-" for t in tasks)
        line = (f"| {name} | {e['retain_achieved']:.3f} | {e['trainable_params']:,} | {cells} | "
                f"{100 * e['mean']:.1f} ± {100 * e['sd']:.1f}")
        if extra:
            w = e.get(f"without_{without}")
            line += " | -" if w is None else f" | {100 * w['mean']:.1f} ± {100 * w['sd']:.1f}"
        lines.append(line + " |")
    return "\n".join(lines)


def metrics_table(summary: Mapping[str, dict]) -> str:
    """Language metrics per method, macro over tasks, mean ± sd over seeds (lm-eval acc / acc_norm)."""
    keys = ["acc", "correct", "answer_nll", "margin"]
    lines = ["| method | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for name, e in summary.items():
        if not e.get("metrics"):
            continue
        cells = []
        for k in keys:
            v = e["metrics"].get(k)
            scale = 100 if k in ("acc", "correct") else 1
            digits = 1 if scale == 100 else 3
            cells.append("-" if v is None else
                         f"{scale * v['mean']:.{digits}f} ± {scale * v['sd']:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(c: Mapping) -> str:
    lo, hi = c["ci_low"], c["ci_high"]
    if lo > 0:
        return "above"
    if hi < 0:
        return "below"
    return "not separable (the interval contains 0)"


def claim_lines(part: str, summary: Mapping[str, dict], comps: Sequence[Mapping]) -> list[str]:
    """Plain sentences, from the numbers: does the paper's ordering hold, at which retain, by how much?

    The ordering is: JACTUS at a retain above compress-then-finetune
    (SVD-LLM+LoRA) at the same retain, and near or above LoRA and DoRA at
    100%. "Above" means the paired 95% interval (items pooled over seeds)
    lies above 0; "near or above" that it does not lie below 0.
    """
    by_pair = {(c["a"], c["b"]): c for c in comps}

    def text(c: Mapping) -> str:
        return (f"{100 * c['difference']:+.1f} points [{100 * c['ci_low']:+.1f}, "
                f"{100 * c['ci_high']:+.1f}]")

    lines = []
    retains = sorted({e["retain"] for e in summary.values() if e["family"] == "JACTUS"})
    for r in retains:
        name = f"JACTUS@{r}"
        ctf = by_pair.get((name, f"SVD-LLM+LoRA@{r}"))
        peft = [by_pair.get((name, f"{b}@1.0")) for b in ("LoRA", "DoRA")]
        if ctf is None or any(c is None for c in peft):
            continue
        above_ctf = ctf["ci_low"] > 0
        near_peft = all(c["ci_high"] >= 0 for c in peft)
        holds = above_ctf and near_peft
        lines.append(
            f"- Retain {r}: the paper's ordering {'HOLDS' if holds else 'does NOT hold'} on {part}. "
            f"{name} against SVD-LLM+LoRA@{r}: {text(ctf)}, {_verdict(ctf)}; "
            f"against LoRA@1.0: {text(peft[0])}, {_verdict(peft[0])}; "
            f"against DoRA@1.0: {text(peft[1])}, {_verdict(peft[1])} "
            f"(accuracy {100 * summary[name]['mean']:.1f} ± {100 * summary[name]['sd']:.1f} "
            f"over {summary[name]['n_seeds']} seeds)."
        )
    if not lines:
        lines.append(f"- {part}: no retain has JACTUS, SVD-LLM+LoRA, LoRA and DoRA together; "
                     "the ordering is not tested.")
    return lines


def plot_predicted_vs_measured(points: Sequence[Mapping], part: str, path: Path) -> None:
    """Predicted loss rise (nats, from the compression report) against the measured one.

    One marker per compression family, one colour per retain; each point is
    one seed (and one target). Log-log: measured rises at or below zero are
    drawn hollow at the bottom edge.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    markers = dict(zip(sorted({p["method"] for p in points}), "osD^v<>pX*", strict=False))
    retains = sorted({p["retain"] for p in points})
    cmap = plt.get_cmap("viridis")
    positive = [p["measured"] for p in points if p["measured"] > 0] + [
        p["predicted"] for p in points if p["predicted"] > 0]
    floor = min(positive) / 10 if positive else 1e-6
    for p in points:
        colour = cmap(retains.index(p["retain"]) / max(1, len(retains) - 1))
        hollow = p["measured"] <= 0
        ax.scatter(max(p["predicted"], floor), max(p["measured"], floor),
                   marker=markers[p["method"]], s=30,
                   facecolors="none" if hollow else colour, edgecolors=colour)
    lo = floor
    hi = max(positive) * 2 if positive else 1.0
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--", label="measured = predicted")
    for method, marker in markers.items():
        ax.scatter([], [], marker=marker, color="k", label=method)
    for r in retains:
        ax.scatter([], [], marker="s", color=cmap(retains.index(r) / max(1, len(retains) - 1)),
                   label=f"retain {r}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted loss rise (nats, 1/2 sum ||S_g^T dW S_x||^2)")
    ax.set_ylabel("measured rise of the mean loss (nats, calibration batches)")
    ax.set_title(f"{part}: predicted vs measured, before tuning")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


UNTUNED_PREFIX = "untuned: "


def family_styles(families, palette: Sequence) -> dict[str, dict]:
    """Line style per family of the accuracy plot: a colour of its own for every tuned family;
    an untuned family (``"untuned: X"``) in X's colour, dashed, with hollow markers.

    ``palette``: the colours, in order (a tuned family takes the next one;
    they repeat only past its length).
    """
    tuned = sorted({f.removeprefix(UNTUNED_PREFIX) for f in families})
    colour = {f: palette[i % len(palette)] for i, f in enumerate(tuned)}
    styles = {}
    for f in families:
        base = f.removeprefix(UNTUNED_PREFIX)
        untuned = base != f
        styles[f] = {"color": colour[base], "linestyle": "--" if untuned else "-",
                     "markerfacecolor": "none" if untuned else colour[base]}
    return styles


def plot_accuracy_vs_retain(rows: Sequence[ResultRow], part: str, path: Path) -> None:
    """Average accuracy against achieved retained fraction, one line per method family.

    Each point is the mean over seeds of the macro average; the error bar
    is the sd over seeds (with one seed: the 95% bootstrap interval).
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[ResultRow]] = {}
    for r in rows:
        if r.part == part and r.task == "average":
            by_method.setdefault(r.method, []).append(r)
    families: dict[str, list[tuple[float, float, float, float]]] = {}
    for group in by_method.values():
        family = group[0].settings.get("family", group[0].method)
        mean, sd = _mean_sd([r.accuracy for r in group])
        if len(group) > 1:
            lo, hi = mean - sd, mean + sd
        else:
            lo = group[0].ci_low if group[0].ci_low is not None else mean
            hi = group[0].ci_high if group[0].ci_high is not None else mean
        retain = float(np.mean([r.retain_achieved for r in group]))
        families.setdefault(family, []).append((retain, mean, lo, hi))
    # ten strong colours, then their light shades
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("tab20").colors[1::2]]
    styles = family_styles(families, palette)
    for family, pts in sorted(families.items()):
        pts.sort()
        x = [p[0] for p in pts]
        y = [100 * p[1] for p in pts]
        err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=family, **styles[family])
    ax.set_xlabel("retained fraction of parameters (achieved)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(f"{part}: accuracy vs retained parameters (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dev_sweep(
    curves: Mapping[str, Mapping[float, tuple[float, float, int]]],
    chosen: Mapping[str, float],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    scale: float = 1.0,
    log_x: bool = True,
) -> dict[str, list[tuple[float, float]]]:
    """A dev sweep's scores: one line per curve, mean ± sd over orders, the chosen point ringed.

    ``curves[name][x] = (mean, sd, orders)`` in the sweep's own score units
    (higher is better), shown times ``scale`` (100 for accuracy in %, -1 for
    the answer NLL); points whose training diverged (a non-finite mean) are
    left out. ``chosen[name]``: the x the sweep chose for that curve, if any.
    Returns the points drawn, ``{name: [(x, scale * mean), ...]}``.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn: dict[str, list[tuple[float, float]]] = {}
    for i, (name, table) in enumerate(curves.items()):
        pts = sorted((x, m, sd) for x, (m, sd, _) in table.items() if math.isfinite(m))
        if not pts:
            continue
        drawn[name] = [(p[0], scale * p[1]) for p in pts]
        colour = plt.get_cmap("tab10").colors[i % 10]
        ax.errorbar([x for x, _ in drawn[name]], [y for _, y in drawn[name]],
                    yerr=[abs(scale) * p[2] for p in pts], marker="o", capsize=3,
                    color=colour, label=name)
        x = chosen.get(name)
        if x is not None and x in table and math.isfinite(table[x][0]):
            ax.plot([x], [scale * table[x][0]], marker="o", markersize=14,
                    markerfacecolor="none", color=colour)
    if log_x:
        ax.set_xscale("log")
    xs = sorted({x for pts in drawn.values() for x, _ in pts})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the grid's own values, not decades
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


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
