"""``python -m validation.sweep --jobs N``: a sweep's families in N processes side by side.

The families (``--families``, in order) are cut into ``N`` contiguous groups,
so that the two compressing families (JACTUS, SVD-LLM+LoRA) share a lane and
its one calibration. Each lane is ``python -m validation.sweep`` with its
group, one thread, its own folder ``<out>/lane<i>`` (records, checkpoints,
page, a copy of the settings it reads tau from, ``log.txt``) and
``--merge-from <out>``: it starts from every record the sweep already holds,
so a rerun, or a sweep resumed from saved records (``--merge-from DIR`` given
to the parent), tunes only what is missing. The lanes' records join the
parent's ``sweep.json`` as they land (every :data:`POLL_S` seconds: the one
file to save, holding every model made so far); when every lane is done,
the choice over every family is made there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import subprocess
import sys
import time
from pathlib import Path

from validation import run_paper
from validation.sweep import ROOT, jactus_task_fraction, merge_records, tau_fields

__all__ = ["family_groups", "gather_records", "lane_argv", "models_recorded", "run_lanes"]

#: Seconds between two looks at the lanes' records (the progress bar's pace).
POLL_S = 30.0


def family_groups(families: list[str], jobs: int) -> list[list[str]]:
    """``families`` in ``min(jobs, len(families))`` contiguous groups whose sizes differ by at most one.

    Every family tunes the same number of models (rates x orders), so equal
    groups are equal lanes.
    """
    if jobs < 1:
        msg = f"--jobs must be at least 1, got {jobs}"
        raise SystemExit(msg)
    n = min(jobs, len(families))
    size, extra = divmod(len(families), n)
    groups, start = [], 0
    for i in range(n):
        stop = start + size + (i < extra)
        groups.append(families[start:stop])
        start = stop
    return groups


def lane_argv(args: argparse.Namespace, group: list[str], lane: Path, out: Path) -> list[str]:
    """The arguments of one lane: the parent's sweep for ``group`` only, in folder ``lane``."""
    argv = ["--part", args.part, "--preset", args.preset,
            "--lrs", *(f"{lr:g}" for lr in args.lrs), "--orders", *map(str, args.orders),
            "--families", ",".join(group), "--out", str(lane),
            "--settings", str(lane / "settings.json"), "--page", str(lane / "page.md"),
            "--merge-from", str(out), "--no-progress"]
    if args.n_dev is not None:
        argv += ["--n-dev", str(args.n_dev)]
    if args.device:
        argv += ["--device", args.device]
    return argv


def run_lanes(args: argparse.Namespace, families: list[str], out: Path, done: dict,
              read_from: Path) -> int:
    """Run the lanes of ``families`` (module docstring), then add their records to ``done``.

    ``done`` is the parent's ``sweep.json`` (``out``), already holding what
    ``--merge-from`` brought; each lane reads its tau from a copy of
    ``read_from``. Returns how many records the lanes added.
    """
    run_paper.atomic_json(out / "sweep.json", done)  # what every lane starts from
    groups = family_groups(families, args.jobs)
    lanes = [out / f"lane{i}" for i in range(len(groups))]
    for lane in lanes:
        lane.mkdir(parents=True, exist_ok=True)
        if read_from.is_file():
            shutil.copyfile(read_from, lane / "settings.json")
    print(f"{len(lanes)} sweep lane(s): " + "; ".join(
        f"{','.join(g)} (log {lane}/log.txt)" for g, lane in zip(groups, lanes, strict=True)),
        flush=True)

    def run_lane(i: int) -> int:
        start = time.perf_counter()
        command = [sys.executable, "-m", "validation.sweep",
                   *lane_argv(args, groups[i], lanes[i], out)]
        with open(lanes[i] / "log.txt", "a") as log:
            code = subprocess.run(command, env=run_paper.one_thread_env(), stdout=log,
                                  stderr=subprocess.STDOUT, check=False,
                                  cwd=ROOT).returncode
        print(f"sweep lane {i} ({','.join(groups[i])}): exit {code} after "
              f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
        return code

    before = len(done)
    with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        futures = [pool.submit(run_lane, i) for i in range(len(lanes))]
        follow_lanes(futures, lanes, families, args, out, done,
                     jactus_task_fraction(tau_fields(read_from, args.part)))
        codes = [f.result() for f in futures]
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        msg = f"sweep lane(s) {failed} failed: see {out}/lane<i>/log.txt"
        raise SystemExit(msg)
    return len(done) - before


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
    """How many of the sweep's models ``done`` holds.

    Those of ``families`` x ``lrs`` at ``steps`` steps, JACTUS's at
    ``task_fraction``: records that ``--out`` keeps from a sweep at other
    steps or another tau are not this sweep's.
    """
    return sum(v.get("family") in families and v.get("lr") in lrs and v.get("steps") == steps
               and (v["family"] != "JACTUS" or v.get("task_fraction") == task_fraction)
               for v in done.values())


def follow_lanes(futures: list, lanes: list[Path], families: list[str],
                 args: argparse.Namespace, out: Path, done: dict, task_fraction: float) -> None:
    """Until every lane has exited, gather their records (:func:`gather_records`) and show the count.

    Every :data:`POLL_S` seconds; a progress bar over the sweep's models, or
    with ``--no-progress`` a line each time the count changes (a lane's log
    has the details).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    total = len(families) * len(args.lrs) * len(set(args.orders)) * dev_parts_per_order(args)
    steps = getattr(run_paper.presets()[args.preset], args.part).steps
    shown = -1
    with tqdm(total=total, desc="sweep models", disable=args.no_progress) as bar:
        while True:
            finished, _ = concurrent.futures.wait(futures, timeout=POLL_S)
            gather_records(done, lanes, out, args.preset)
            count = models_recorded(done, families, set(args.lrs), steps, task_fraction)
            if count != shown:
                bar.update(count - bar.n)
                if args.no_progress:
                    print(f"sweep lanes: {count} of {total} models recorded", flush=True)
                shown = count
            if len(finished) == len(futures):
                return
