"""Copy a finished run's table and plots into the docs (``docs/results/``).

Usage: ``python validation/publish_results.py results/default``. The page
keeps the run's command, date and machine, as written by ``run_paper.py``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def publish(run: Path, dest: Path = DOCS) -> Path:
    """Copy ``results.md``, the PNG plots and ``results.csv`` of ``run`` into ``dest``."""
    if not (run / "results.md").exists():
        msg = f"{run} has no results.md: run validation/run_paper.py first"
        raise SystemExit(msg)
    dest.mkdir(parents=True, exist_ok=True)
    text = (run / "results.md").read_text()
    for png in sorted(run.glob("*.png")):
        shutil.copy2(png, dest / f"{run.name}-{png.name}")
        text = text.replace(f"]({png.name})", f"]({run.name}-{png.name})")
    shutil.copy2(run / "results.csv", dest / f"{run.name}.csv")
    page = dest / f"{run.name}.md"
    page.write_text(text)
    return page


if __name__ == "__main__":
    print(publish(Path(sys.argv[1] if len(sys.argv) > 1 else "results/default")))
