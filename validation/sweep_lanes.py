"""``--jobs N``: a dev sweep's models in N processes side by side.

Both sweeps use it: :mod:`validation.sweep` cuts its families (``--families``,
in order) into ``N`` contiguous groups, so that the two compressing families
(JACTUS, SVD-LLM+LoRA) share a lane and its one calibration;
:mod:`validation.sweep_tau` cuts its task fractions. Each lane is the sweep's
own module with its group, one thread, its own folder ``<out>/lane<i>``
(records, checkpoints, page, a copy of the settings it reads, ``log.txt``)
and ``--merge-from <out>``: it starts from every record the sweep already
holds, so a rerun, or a sweep resumed from saved records (``--merge-from
DIR`` given to the parent), tunes only what is missing. The lanes' records
join the parent's ``sweep.json`` as they land (every :data:`POLL_S`
seconds: the one file to save, holding every model made so far); when
every lane is done, the parent makes the choice over all of them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from validation import run_paper
from validation.sweep import ROOT, merge_records

__all__ = ["Lanes", "contiguous_groups", "family_groups", "gather_records", "lane_argv",
           "lane_folders", "models_recorded", "run_lanes", "shared_lane_argv", "sweep_with_lanes"]

#: Seconds between two looks at the lanes' records (the progress bar's pace).
POLL_S = 30.0


def contiguous_groups(items: Sequence, jobs: int) -> list[list]:
    """``items`` in ``min(jobs, len(items))`` contiguous groups whose sizes differ by at most one."""
    if jobs < 1:
        msg = f"--jobs must be at least 1, got {jobs}"
        raise SystemExit(msg)
    n = min(jobs, len(items))
    size, extra = divmod(len(items), n)
    groups, start = [], 0
    for i in range(n):
        stop = start + size + (i < extra)
        groups.append(list(items[start:stop]))
        start = stop
    return groups


def family_groups(families: list[str], jobs: int) -> list[list[str]]:
    """The learning-rate sweep's lanes: :func:`contiguous_groups` of ``families``.

    Every family tunes the same number of models (rates x orders), so equal
    groups are equal lanes.
    """
    return contiguous_groups(families, jobs)


def shared_lane_argv(args: argparse.Namespace, lane: Path, out: Path) -> list[str]:
    """The arguments every lane of either sweep takes from the parent, with its own folder ``lane``."""
    argv = ["--part", args.part, "--preset", args.preset, "--orders", *map(str, args.orders),
            "--out", str(lane), "--settings", str(lane / "settings.json"),
            "--page", str(lane / "page.md"), "--merge-from", str(out), "--no-progress"]
    if args.n_dev is not None:
        argv += ["--n-dev", str(args.n_dev)]
    if args.stats_from:  # absolute: the lanes run in the repository's root
        argv += ["--stats-from", *(str(folder.resolve()) for folder in args.stats_from)]
    if args.device:
        argv += ["--device", args.device]
    return argv


def lane_argv(args: argparse.Namespace, group: list[str], lane: Path, out: Path) -> list[str]:
    """The arguments of one learning-rate sweep lane: the parent's sweep for ``group`` only."""
    return [*shared_lane_argv(args, lane, out), "--lrs", *(f"{lr:g}" for lr in args.lrs),
            "--families", ",".join(group)]


def lane_folders(out: Path, n: int, read_from: Path) -> list[Path]:
    """``<out>/lane0 .. lane<n-1>``, made, each with a copy of the settings file ``read_from``."""
    lanes = [out / f"lane{i}" for i in range(n)]
    for lane in lanes:
        lane.mkdir(parents=True, exist_ok=True)
        if read_from.is_file():
            shutil.copyfile(read_from, lane / "settings.json")
    return lanes


class Lanes(NamedTuple):
    """What :func:`run_lanes` runs: one ``python -m <module> <argv>`` per lane folder, and how to count.

    Attributes
    ----------
    module : str
        The sweep's module (``validation.sweep`` or ``validation.sweep_tau``).
    folders : list of Path
        The lanes' folders (:func:`lane_folders`).
    argvs : list of list of str
        Each lane's arguments.
    names : list of str
        What each lane tunes, for the log lines.
    count : callable
        ``count(done)``: how many of the sweep's models the records ``done`` hold.
    total : int
        How many models the sweep makes.
    """

    module: str
    folders: list[Path]
    argvs: list[list[str]]
    names: list[str]
    count: Callable[[dict], int]
    total: int


def run_lanes(lanes: Lanes, out: Path, done: dict, preset: str, progress: bool) -> int:
    """Run ``lanes`` side by side, then add their records to ``done``; return how many they added.

    ``done`` is the parent's ``sweep.json`` (in ``out``), already holding
    what ``--merge-from`` brought: written first, it is what every lane
    starts from.
    """
    run_paper.atomic_json(out / "sweep.json", done)
    print(f"{len(lanes.folders)} sweep lane(s): " + "; ".join(
        f"{name} (log {lane}/log.txt)" for name, lane in zip(lanes.names, lanes.folders, strict=True)),
        flush=True)

    def run_lane(i: int) -> int:
        start = time.perf_counter()
        command = [sys.executable, "-m", lanes.module, *lanes.argvs[i]]
        with open(lanes.folders[i] / "log.txt", "a") as log:
            code = subprocess.run(command, env=run_paper.one_thread_env(), stdout=log,
                                  stderr=subprocess.STDOUT, check=False,
                                  cwd=ROOT).returncode
        print(f"sweep lane {i} ({lanes.names[i]}): exit {code} after "
              f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
        return code

    before = len(done)
    with concurrent.futures.ThreadPoolExecutor(len(lanes.folders)) as pool:
        futures = [pool.submit(run_lane, i) for i in range(len(lanes.folders))]
        follow_lanes(futures, lanes, out, done, preset, progress)
        codes = [f.result() for f in futures]
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        msg = f"sweep lane(s) {failed} failed: see {out}/lane<i>/log.txt"
        raise SystemExit(msg)
    return len(done) - before


def sweep_with_lanes(args: argparse.Namespace, out: Path, lanes: Lanes, merged: int = 0) -> None:
    """Run a sweep's ``lanes`` from the records of ``out`` and ``--merge-from``; gather theirs in ``out``.

    ``merged``: records the caller already brought from ``--merge-from``,
    added to the count of those merged here for the line it prints.

    The parent's ``--merge-from`` is then emptied: its records are in
    ``out``'s ``sweep.json``, where the parent (the caller) finds nothing
    left to tune and makes the choice.
    """
    done_path = out / "sweep.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    merged += merge_records(done, args.merge_from, args.preset)
    added = run_lanes(lanes, out, done, args.preset, progress=not args.no_progress)
    print(f"--jobs {args.jobs}: {merged} records from --merge-from, {added} from the lanes, "
          f"in {done_path}", flush=True)
    args.merge_from = []


def dev_parts_per_order(args: argparse.Namespace) -> int:
    """Dev parts a model is tuned on per order: vision's targets, language's one part."""
    if args.part == "language":
        return 1
    return len(run_paper.presets()[args.preset].vision.targets)


def gather_records(done: dict, lanes: list[Path], out: Path, preset: str) -> None:
    """Add the lanes' records so far to ``done`` and write it to ``out``'s ``sweep.json``.

    So that one file holds every model the sweep has made while it runs: the
    file to save elsewhere (``--merge-from`` resumes from it).
    """
    merge_records(done, [lane for lane in lanes if (lane / "sweep.json").is_file()], preset)
    run_paper.atomic_json(out / "sweep.json", done)


def models_recorded(done: dict, families: list[str], lrs, steps: int, task_fraction: float) -> int:
    """How many of the learning-rate sweep's models ``done`` holds.

    Those of ``families`` x ``lrs`` at ``steps`` steps, JACTUS's at
    ``task_fraction``: records that ``--out`` keeps from a sweep at other
    steps or another tau are not this sweep's.
    """
    return sum(v.get("family") in families and v.get("lr") in lrs and v.get("steps") == steps
               and (v["family"] != "JACTUS" or v.get("task_fraction") == task_fraction)
               for v in done.values())


def follow_lanes(futures: list, lanes: Lanes, out: Path, done: dict, preset: str,
                 progress: bool) -> None:
    """Until every lane has exited, gather their records (:func:`gather_records`) and show the count.

    Every :data:`POLL_S` seconds; a progress bar over the sweep's models, or
    without ``progress`` a line each time the count changes (a lane's log
    has the details).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    shown = -1
    with tqdm(total=lanes.total, desc="sweep models", disable=not progress) as bar:
        while True:
            finished, _ = concurrent.futures.wait(futures, timeout=POLL_S)
            gather_records(done, lanes.folders, out, preset)
            count = lanes.count(done)
            if count != shown:
                bar.update(count - bar.n)
                if not progress:
                    print(f"sweep lanes: {count} of {lanes.total} models recorded", flush=True)
                shown = count
            if len(finished) == len(futures):
                return
