"""Copy a finished run's table, verdict and plots into the docs and the README.

Usage: ``python validation/publish_results.py results/default`` (or
``results/full``). Writes, from the run's own files (no number is typed by
hand):

* ``docs/results/<run>.md`` (the run's ``results.md``), its plots as
  ``docs/results/<run>-<plot>.png`` and ``docs/results/<run>.csv``;
* the block between ``<!-- results:<run>:start -->`` and
  ``<!-- results:<run>:end -->`` in ``README.md`` and in
  ``docs/results/index.md``: the run's ``summary.md`` (command, date, wall
  time, machine, the verdict on the paper's ordering with the paired
  intervals, and the mean ± sd table of each part). A file without the
  markers is left alone;
* ``docs/results/records/<run>/methods/``: the run's method records (one
  small JSON file per method and seed), so that they outlive the machine:
  ``python validation/run_paper.py --records-from docs/results/records/<run>``
  reuses every one whose settings are unchanged.

``--records-only`` copies only the method records, of a run still going or
cut off (the full preset's runs span several sessions, and a machine's
``results/`` does not outlive its session): commit them, and a rerun
anywhere with ``--records-from docs/results/records/<run>`` resumes there.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "results"
README = ROOT / "README.md"


def replace_block(text: str, name: str, block: str) -> str | None:
    """``text`` with the lines between the ``results:<name>`` markers replaced by ``block``.

    Returns None when ``text`` has no such pair of markers.
    """
    start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return None
    return text[: i + len(start)] + "\n" + block.strip() + "\n" + text[j:]


def copy_records(run: Path, to: Path) -> int:
    """Copy the method records of ``run`` (``<run>/methods/*.json``) into ``to``; return how many."""
    records = sorted((run / "methods").glob("*.json"))
    if records:
        to.mkdir(parents=True, exist_ok=True)
    for record in records:
        shutil.copy2(record, to / record.name)
    return len(records)


def publish(run: Path, dest: Path = DOCS, readme: Path | None = README) -> Path:
    """Copy ``results.md``, the PNG plots and ``results.csv`` of ``run`` into ``dest``; fill the blocks."""
    if not (run / "results.md").exists():
        msg = f"{run} has no results.md: run validation/run_paper.py first"
        raise SystemExit(msg)
    dest.mkdir(parents=True, exist_ok=True)
    text = (run / "results.md").read_text()
    for png in sorted(run.glob("*.png")):
        shutil.copy2(png, dest / f"{run.name}-{png.name}")
        text = text.replace(f"]({png.name})", f"]({run.name}-{png.name})")
    shutil.copy2(run / "results.csv", dest / f"{run.name}.csv")
    copy_records(run, dest / "records" / run.name / "methods")
    page = dest / f"{run.name}.md"
    page.write_text(text)
    summary = run / "summary.md"
    if summary.exists():
        block = summary.read_text()
        targets = [(dest / "index.md", f"[The full page]({run.name}.md).")]
        if readme is not None:
            targets.append((readme, f"The full page: `docs/results/{run.name}.md`."))
        for path, link in targets:
            if path.exists():
                new = replace_block(path.read_text(), run.name, block + "\n\n" + link)
                if new is not None:
                    path.write_text(new)
    return page


def publish_records(run: Path, dest: Path = DOCS) -> int:
    """``--records-only``: :func:`copy_records` of ``run`` into ``dest/records/<run>/methods``."""
    if not (run / "methods").is_dir():
        msg = f"{run} has no methods/ folder: no method of it has finished yet"
        raise SystemExit(msg)
    return copy_records(run, dest / "records" / run.name / "methods")


def main(argv: list[str] | None = None) -> None:
    """The command line: publish a run (default ``results/default``), or only its records."""
    p = argparse.ArgumentParser(prog="python validation/publish_results.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", default=Path("results/default"))
    p.add_argument("--records-only", action="store_true",
                   help="copy only the method records (a run not finished yet)")
    args = p.parse_args(argv)
    if args.records_only:
        copied = publish_records(args.run)
        print(f"{copied} method records of {args.run} in "
              f"{DOCS / 'records' / args.run.name / 'methods'}")
    else:
        print(publish(args.run))


if __name__ == "__main__":
    main()
