"""Same seed and data: bit-identical statistics and factors, in one process and in two.

The model comes from ``tests/torch/tiny_mlp.py`` (no ``transformers``), so the
spawned processes start quickly. ``docs/failure-modes.md`` lists these promises.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from jactus_linalg.torch import (
    CalibrationStats,
    calibrate,
    compress,
)

from ..numerics import tolerance
from .tiny_mlp import (
    assert_bit_identical,
    make_batches,
    make_mlp,
    mlp_loss,
    stat_tensors,
)


def test_same_seed_and_data_give_bit_identical_statistics_and_factors():
    """Calibrating twice and compressing twice in one process.

    Every statistic and every factor is bit-identical.
    """
    batches = make_batches()
    one = calibrate(make_mlp(), batches, mlp_loss, progress=False)
    two = calibrate(make_mlp(), batches, mlp_loss, progress=False)
    assert_bit_identical(stat_tensors(one), stat_tensors(two))
    for method in ("jactus", "svd-llm"):
        a, b = make_mlp(), make_mlp()
        ra = compress(a, one, retain=0.7, method=method, progress=False)
        rb = compress(b, two, retain=0.7, method=method, progress=False)
        assert ra.ranks == rb.ranks
        assert_bit_identical(a.state_dict(), b.state_dict())


def _two_process_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = calibrate(make_mlp(), make_batches(n=4)[rank::world], mlp_loss, progress=False)
        model = make_mlp()
        compress(model, stats, retain=0.7, progress=False)
        if rank == 0:
            stats.save(f"{out}.stats.safetensors")
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()},
                f"{out}.model.safetensors",
            )
    finally:
        dist.destroy_process_group()


def test_two_process_runs_are_bit_identical(tmp_path):
    """Two 2-process (gloo) runs agree bit for bit.

    One process agrees with them to float64 rounding only: it adds the same
    sums in another order.
    """
    from safetensors.torch import load_file

    runs = []
    for i in range(2):
        out = str(tmp_path / f"run{i}")
        mp.spawn(
            _two_process_worker, args=(2, str(tmp_path / f"init{i}"), out), nprocs=2, join=True
        )
        runs.append(
            (
                CalibrationStats.load(f"{out}.stats.safetensors"),
                load_file(f"{out}.model.safetensors"),
            )
        )
    (s0, m0), (s1, m1) = runs
    assert_bit_identical(stat_tensors(s0), stat_tensors(s1))
    assert_bit_identical(m0, m1)
    # one process over the same data: the same sums in another order, so equal to rounding
    single = calibrate(make_mlp(), make_batches(n=4), mlp_loss, progress=False)
    assert s0.n_batches == single.n_batches == 4
    for name in single:
        a, b = single.layer(name), s0.layer(name)
        assert a.n_samples == b.n_samples
        for x, y in (
            (a.input_cov, b.input_cov),
            (a.grad_cov, b.grad_cov),
            (a.grad_mean, b.grad_mean),
        ):
            assert (x - y).abs().max() <= tolerance(torch.float64, 4) * x.abs().max()
