"""Benchmark: a retain sweep from one decomposition, and whole-model compress against its LAPACK floor.

Two rows on a ViT-Base-width model (hidden 768, MLP 3072; ``--vit-layers``
blocks, every block the same shapes, so the ratios do not depend on the
count) with the synthetic float64 statistics of ``bench.synthetic_stats``:

``retain sweep / one retain`` (target <= 1.2x)
    :func:`jactus_linalg.torch.compress_many` at retains 0.6, 0.7, 0.8, 0.9
    (one :func:`~jactus_linalg.torch.prepare_compression`, then allocation
    and factor extraction per retain, each on a ``deepcopy`` of the model)
    against one ``compress(deepcopy(model), stats, retain=0.8)``.
``compress / sum of the layers' LAPACK floors`` (target <= 1.2x)
    The same single ``compress`` against the LAPACK calls no implementation
    of it can skip: a Cholesky factorization of each damped input
    covariance (once per input group, as ``compress`` shares it), of each
    damped gradient covariance, and a ``gesdd`` SVD of each whitened weight
    :math:`M = L_g^\\top W L_x` (built untimed), all by scipy in float64.
    Unlike the per-layer floor of ``bench_factorization.lapack_floor``,
    it leaves out the un-whitening (two ``trsm`` at each layer's rank): the
    ranks come from the global allocation, which the floor does not run, so
    this floor is the lower, stricter one.

The three functions are timed side by side in rotating order
(``bench.rounds``); a ratio is the median of the per-round ratios, of wall
time and, in two more rows, of process CPU time (what the wall time is on a
quiet machine, one thread; on a loaded one the wall time also counts the
waits for a core).

Run through ``python validation/bench.py --only retain-sweep`` (``--quick``:
a tiny ViT in seconds).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import numpy as np
import scipy.linalg

from validation.bench import (
    BenchResult,
    Row,
    build_vit,
    medians,
    paired_ratio,
    rounds,
    say,
    synthetic_stats,
    vit_config,
)

RETAINS = (0.6, 0.7, 0.8, 0.9)
ONE_RETAIN = 0.8


def floor_inputs(model: Any, stats: Any) -> list[tuple[str, np.ndarray]]:
    """Damped covariances (one per input group, one per layer's gradient) and each layer's ``M``.

    Damping is the plan's own (``whitening.DEFAULT_DAMPING`` times the mean
    diagonal); ``M = L_gᵀ W L_x`` from the Cholesky factors, built here,
    untimed.
    """
    from validation.bench_factorization import contract_damping

    def damped(cov: np.ndarray) -> np.ndarray:
        return cov + contract_damping(cov) * np.eye(cov.shape[0])

    modules = dict(model.named_modules())
    inputs: dict[str, np.ndarray] = {}
    out: list[tuple[str, np.ndarray]] = []
    for name in stats.layers:
        layer = stats.layer(name)
        group = stats.layers[name].input_group
        if group not in inputs:
            inputs[group] = damped(np.asarray(layer.input_cov, dtype=np.float64))
            out.append(("cholesky", inputs[group]))
        cg = damped(np.asarray(layer.grad_cov, dtype=np.float64))
        out.append(("cholesky", cg))
        lx = scipy.linalg.cholesky(inputs[group], lower=True)
        lg = scipy.linalg.cholesky(cg, lower=True)
        weight = modules[name].weight.detach().double().numpy()
        out.append(("gesdd", lg.T @ weight @ lx))
    return out


def lapack_floor(matrices: list[tuple[str, np.ndarray]]) -> None:
    """Cholesky of every damped covariance, gesdd of every whitened weight."""
    for kind, a in matrices:
        if kind == "cholesky":
            scipy.linalg.cholesky(a, lower=True, check_finite=False)
        else:
            scipy.linalg.svd(a, full_matrices=False, check_finite=False, lapack_driver="gesdd")


def bench_retain_sweep(args: argparse.Namespace) -> BenchResult:
    """Retain sweep / one retain (<= 1.2x); compress / sum of its layers' LAPACK floors (<= 1.2x)."""
    import torch

    from jactus_linalg.torch import compress, compress_many

    res = BenchResult("retain-sweep", "retain sweep from one decomposition; compress vs LAPACK floor")
    layers = None if args.quick else args.vit_layers
    config = vit_config(args.quick, layers=layers)
    model = build_vit(config)
    example = torch.zeros(1, config.num_channels, config.image_size, config.image_size)
    stats = synthetic_stats(model, example)
    floor = floor_inputs(model, stats)
    kept: dict[str, Any] = {}

    def one() -> None:
        student = copy.deepcopy(model)
        kept["one"] = (student, compress(student, stats, retain=ONE_RETAIN, progress=False))

    def sweep() -> None:
        kept["sweep"] = compress_many(model, stats, RETAINS, progress=False)

    case = ("tiny ViT (quick)" if args.quick
            else f"ViT-Base widths, {config.num_hidden_layers} block(s), {len(stats.layers)} linears")
    say(f"  retain-sweep: {case}, {args.repeat} round(s)")
    times = rounds({"one": one, "sweep": sweep, "floor": lambda: lapack_floor(floor)}, args.repeat)
    ranks_one = kept["one"][1].ranks
    ranks_sweep = kept["sweep"][RETAINS.index(ONE_RETAIN)][1].ranks
    if ranks_one != ranks_sweep:
        msg = "the sweep's ranks at retain 0.8 differ from compress's: the sweep is wrong"
        raise RuntimeError(msg)
    res.rows = [
        Row("retain-sweep", case, f"compress_many {RETAINS} / one compress",
            paired_ratio(times, "sweep", "one"), 1.2, "<="),
        Row("retain-sweep", case, "compress(retain=0.8) / sum of layers' LAPACK floors",
            paired_ratio(times, "one", "floor"), 1.2, "<="),
        # process CPU time: on a loaded machine, wall time also counts the waits for a core
        Row("retain-sweep", case, f"CPU time: compress_many {RETAINS} / one compress",
            paired_ratio(times, "sweep", "one", "cpu"), 1.2, "<="),
        Row("retain-sweep", case, "CPU time: compress(retain=0.8) / LAPACK floors",
            paired_ratio(times, "one", "floor", "cpu"), 1.2, "<="),
    ]
    covs = sum(kind == "cholesky" for kind, _ in floor)
    res.details = {"median_s": medians(times), "median_cpu_s": medians(times, "cpu"),
                   "times_s": times, "layers": len(stats.layers), "cholesky": covs,
                   "svds": len(floor) - covs,
                   "retain_achieved": {r: rep.retain_achieved
                                       for r, (_, rep) in zip(RETAINS, kept["sweep"], strict=True)}}
    med = res.details["median_s"]
    res.notes.append(
        f"median s: one compress {med['one']:.2f}, sweep of {len(RETAINS)} {med['sweep']:.2f}, "
        f"floor {med['floor']:.2f} ({covs} Cholesky factorizations: input covariances once per "
        f"input group, gradient covariances per layer; {len(floor) - covs} gesdd SVDs of M); "
        "the sweep's ranks at 0.8 equal compress's (checked)"
    )
    return res
