"""Where a learning-rate sweep stands: the dev scores its records hold so far.

A sweep (:mod:`validation.sweep`) chooses nothing until every rate of a
family has all its data orders, and a long one (the full preset's language
sweep: 48 models, about 25 min each on one core) lands over several
sessions. This prints what its ``sweep.json`` holds at any moment, as a
markdown table: one row per family, one column per rate, each cell the
mean ± sd of the dev score over the orders recorded so far and how many
orders that is. A family whose every rate has all its orders is marked
complete, and its best rate (the one :func:`validation.sweep.select`
would choose from these records) is in bold; nothing is bold for a family
that is still running.

The score is the one the sweep selects on (:func:`validation.sweep.dev_score`):
for language the answer's negative log-likelihood in nats per token
(lower is better), for vision the dev accuracy in % (macro over targets;
an order counts once every target has it).

Usage: ``python -m validation.sweep_status docs/results/records/sweep-language-full``
(a folder holding ``sweep.json``, or the file itself); ``--orders`` is how
many orders make a rate complete (3, as the protocol asks). ``--into FILE
...`` also writes the table into each file, between the lines
``<!-- sweep-status:begin -->`` and ``<!-- sweep-status:end -->`` (the
README and ``docs/results/index.md`` show the full sweep's progress so;
``tests/test_readme.py`` checks that they match the committed records).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from validation.sweep import (
    FAMILY_METHODS,
    HEAD,
    ORDERS,
    markdown_header,
    markdown_row,
    mean_sd_n,
    mean_sd_text,
    score_scale,
)


def records_path(path: Path) -> Path:
    """``path`` itself if it is a file, else its ``sweep.json``."""
    return path if path.is_file() else path / "sweep.json"


def load_records(path: Path) -> dict:
    """The records of the sweep at ``path`` (:func:`records_path`), by label."""
    file = records_path(path)
    if not file.is_file():
        msg = f"path: {file} does not exist (give a sweep folder or its sweep.json)"
        raise SystemExit(msg)
    return json.loads(file.read_text())


def part_of(records: dict) -> str:
    """``language`` when every record's target is the language part, else ``vision``."""
    return "language" if all(r.get("target") == "language" for r in records.values()) else "vision"


#: what besides the family sets a row: records that differ in these are never pooled
ROW_FIELDS = ("steps", "task_fraction", "lr_head")


def row_key(record: dict) -> tuple:
    """The record's row: its family and :data:`ROW_FIELDS` (``None`` where it has none)."""
    return (record["family"], *(record.get(f) for f in ROW_FIELDS))


def scores_by_cell(records: dict) -> dict:
    """``{row: {lr: [score per order, ...]}}``, rows by :func:`row_key` in the sweep's order.

    Vision records are first averaged over targets per (row, rate, order),
    and an order counts only once it has every target the sweep's records
    name, as the sweep averages them before it chooses.
    """
    targets = {r.get("target") for r in records.values()}
    pooled: dict[tuple, dict[str, float]] = {}
    for r in records.values():
        pooled.setdefault((row_key(r), r["lr"], r["order"]), {})[r.get("target")] = r["score"]
    cells: dict[tuple, dict[float, list[float]]] = {}
    for (row, lr, _order), by_target in sorted(pooled.items(), key=lambda kv: kv[0][1:]):
        if set(by_target) == targets:
            cells.setdefault(row, {}).setdefault(lr, []).append(
                float(np.mean(list(by_target.values()))))
    return dict(sorted(cells.items(), key=lambda kv: (family_rank(kv[0][0]), repr(kv[0]))))


def row_name(row: tuple, rows) -> str:
    """The family, with each of :data:`ROW_FIELDS` that differs between the family's rows."""
    same_family = [r for r in rows if r[0] == row[0]]
    varying = [i for i in range(1, len(row)) if len({r[i] for r in same_family}) > 1]
    return " ".join([row[0], *(f"{ROW_FIELDS[i - 1]}={row[i]:g}" if row[i] is not None
                              else f"{ROW_FIELDS[i - 1]}=-" for i in varying)])


def family_rank(family: str) -> int:
    """Rows in the sweep's order: the head (vision), then :data:`validation.sweep.FAMILY_METHODS`."""
    order = [HEAD, *FAMILY_METHODS]
    return order.index(family) if family in order else len(order)


def score_text(part: str, mean: float, sd: float, n: int) -> str:
    """A cell's score: mean ± sd over ``n`` orders, or the one score when ``n`` is 1."""
    if n > 1:
        return mean_sd_text(part, mean, sd)
    scale, digits = score_scale(part)
    return f"{scale * mean:.{digits}f}"


def status_table(records: dict, orders: int = len(ORDERS)) -> list[str]:
    """The markdown lines of :mod:`validation.sweep_status`: a summary line, then the table."""
    if orders < 1:
        msg = f"orders: must be at least 1, got {orders}"
        raise ValueError(msg)
    part = part_of(records)
    cells = scores_by_cell(records)
    lrs = sorted({lr for by_lr in cells.values() for lr in by_lr})
    metric = ("dev answer NLL, nats per token (lower is better)" if part == "language"
              else "dev accuracy, % (macro over targets)")
    lines = [f"{len(records)} models recorded; {part}; cells: {metric}, mean ± sd over the "
             f"orders so far (n of {orders} orders); bold: the best rate of a complete family.",
             "", *markdown_header("family", *(f"{lr:g}" for lr in lrs), "status")]
    for row, by_lr in cells.items():
        table = {lr: mean_sd_n(scores) for lr, scores in by_lr.items()}
        complete = len(table) == len(lrs) and all(n >= orders for _, _, n in table.values())
        best = max(table, key=lambda lr: (table[lr][0], -lr)) if complete else None
        texts = []
        for lr in lrs:
            if lr not in table:
                texts.append("-")
                continue
            mean, sd, n = table[lr]
            text = f"{score_text(part, mean, sd, n)} ({n} of {orders})"
            texts.append(f"**{text}**" if lr == best else text)
        done = sum(min(n, orders) for _, _, n in table.values())
        status = (f"complete: {best:g}" if complete
                  else f"{done} of {orders * len(lrs)} models")
        lines.append(markdown_row(row_name(row, cells), *texts, status))
    return lines


BEGIN, END = "<!-- sweep-status:begin -->", "<!-- sweep-status:end -->"
BLOCK = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)


def shown_in(text: str) -> list[str]:
    """The lines between the markers of ``text`` (one block), without the markers."""
    blocks = BLOCK.findall(text)
    if len(blocks) != 1:
        msg = f"expected one {BEGIN} ... {END} block, found {len(blocks)}"
        raise ValueError(msg)
    return blocks[0].split("\n")[1:-1]


def write_into(path: Path, lines: list[str]) -> None:
    """Replace the lines between the markers of ``path`` (:func:`shown_in`) with ``lines``."""
    text = path.read_text()
    try:
        shown_in(text)
    except ValueError as err:
        msg = f"--into: {path}: {err}"
        raise SystemExit(msg) from None
    path.write_text(BLOCK.sub(lambda _: "\n".join([BEGIN, *lines, END]), text))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.sweep_status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a sweep folder (its sweep.json) or a sweep.json")
    p.add_argument("--orders", type=int, default=len(ORDERS),
                   help="how many data orders make a rate complete (default %(default)s)")
    p.add_argument("--into", type=Path, nargs="+", default=[], metavar="FILE",
                   help=f"also write the table between {BEGIN} and {END} in each FILE")
    return p


def main(argv: list[str] | None = None) -> list[str]:
    """Print the status table of a sweep's records; return its lines."""
    args = _parser().parse_args(argv)
    if args.orders < 1:
        msg = f"--orders: must be at least 1, got {args.orders}"
        raise SystemExit(msg)
    lines = status_table(load_records(args.path), args.orders)
    print("\n".join(lines))
    for path in args.into:
        write_into(path, lines)
    return lines


if __name__ == "__main__":
    main()
