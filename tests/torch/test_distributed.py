"""Two-process torch.distributed (gloo, CPU) calibration equals one process over the same data."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from jactus_linalg.torch import CalibrationStats, calibrate

from ..numerics import tolerance
from .models import hf_loss, llama_batches, tiny_llama


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = llama_batches(n=4)[rank::world]  # each process sees its own shard
        stats = calibrate(tiny_llama(), batches, hf_loss, progress=False)
        if rank == 0:
            stats.save(out)
    finally:
        dist.destroy_process_group()


def test_two_process_calibration_equals_single_process(tmp_path):
    out = tmp_path / "stats.safetensors"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    merged = CalibrationStats.load(out)
    single = calibrate(tiny_llama(), llama_batches(n=4), hf_loss, progress=False)
    assert merged.n_batches == single.n_batches == 4
    assert list(merged) == list(single)
    for name in single:
        a, b = single.layer(name), merged.layer(name)
        assert a.n_samples == b.n_samples
        for x, y in ((a.input_cov, b.input_cov), (a.grad_cov, b.grad_cov), (a.grad_mean, b.grad_mean)):
            tol = tolerance(torch.float64, 4, c=10) * x.abs().max().item()
            assert (x - y).abs().max().item() <= tol
