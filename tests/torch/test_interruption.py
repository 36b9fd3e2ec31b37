"""Interrupted calibration: checkpoints resume bit-identically, only the run that wrote them.

``docs/failure-modes.md`` lists these promises; saving a compressed model is
in ``tests/torch/test_save_safety.py``.
"""

from __future__ import annotations

import pytest

from jactus_linalg.torch import (
    CalibrationStats,
    calibrate,
    compress,
)
from jactus_linalg.torch import stats as jstats

from .tiny_mlp import (
    assert_bit_identical,
    make_batches,
    make_mlp,
    mlp_loss,
    stat_tensors,
)


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("mode", ["gram", "qr"])
def test_killed_calibration_resumes_bit_identical(tmp_path, mode):
    """Killed at batch 3 (checkpoint every 2), then resumed.

    Statistics and factors equal those of an uninterrupted run, bit for bit.
    """
    batches = make_batches(n=5)
    full = calibrate(make_mlp(), batches, mlp_loss, mode=mode, progress=False)
    ckpt = tmp_path / "calib.safetensors"

    def dies_at_3(model, batch):
        if batch is batches[3]:
            raise _Killed("killed at batch 3")
        return mlp_loss(model, batch)

    with pytest.raises(_Killed):
        calibrate(
            make_mlp(),
            batches,
            dies_at_3,
            mode=mode,
            checkpoint=ckpt,
            checkpoint_every=2,
            progress=False,
        )
    assert CalibrationStats.load(ckpt).n_batches == 2  # the last completed checkpoint
    resumed = calibrate(
        make_mlp(), batches, mlp_loss, mode=mode, checkpoint=ckpt, checkpoint_every=2, progress=False
    )
    assert resumed.n_batches == full.n_batches == 5
    assert {k: a.count for k, a in resumed.inputs.items()} == {
        k: a.count for k, a in full.inputs.items()
    }
    assert_bit_identical(stat_tensors(full), stat_tensors(resumed))
    a, b = make_mlp(), make_mlp()
    compress(a, full, retain=0.7, progress=False)
    compress(b, resumed, retain=0.7, progress=False)
    assert_bit_identical(a.state_dict(), b.state_dict())


def test_resume_with_other_arguments_is_refused(tmp_path):
    """A checkpoint resumes only the calibration that wrote it.

    Mixing two calibrations would corrupt the statistics silently.
    """
    ckpt = tmp_path / "calib.safetensors"
    calibrate(make_mlp(), make_batches(n=2), mlp_loss, checkpoint=ckpt, checkpoint_every=1, progress=False)
    with pytest.raises(
        ValueError,
        match=r"written with target_names=\['0', '2', '4'\].*target_names=\['2'\].*same arguments",
    ):
        calibrate(make_mlp(), make_batches(n=4), mlp_loss, targets=["2"], checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match=r"written with mode='gram'"):
        calibrate(make_mlp(), make_batches(n=4), mlp_loss, mode="qr", checkpoint=ckpt, progress=False)


def test_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    """CalibrationStats.save is atomic.

    Killed mid-write, the old checkpoint is intact and no temp file is left.
    """
    ckpt = tmp_path / "calib.safetensors"
    first = calibrate(make_mlp(), make_batches(n=2), mlp_loss, progress=False)
    first.save(ckpt)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(jstats, "save_file", crash)
    second = calibrate(make_mlp(), make_batches(n=3), mlp_loss, progress=False)
    with pytest.raises(KeyboardInterrupt):
        second.save(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors"]
    assert_bit_identical(stat_tensors(CalibrationStats.load(ckpt)), stat_tensors(first))


def test_checkpoint_suffix_is_checked_before_any_work(tmp_path):
    """A checkpoint name the reader would refuse is refused before the first batch.

    Before: `checkpoint="calib.ckpt"` was written by the first call, and the
    second call (the resume) raised.
    """
    batches_seen = []

    def counting_loss(model, batch):
        batches_seen.append(batch)
        return mlp_loss(model, batch)

    for name in ("calib.ckpt", "calib"):
        with pytest.raises(ValueError, match=rf"`checkpoint` must be a \.safetensors file.*{name}$"):
            calibrate(
                make_mlp(), make_batches(n=2), counting_loss,
                checkpoint=tmp_path / name, checkpoint_every=1, progress=False,
            )
    assert batches_seen == [] and list(tmp_path.iterdir()) == []
    folder = tmp_path / "calib.safetensors"
    folder.mkdir()
    with pytest.raises(ValueError, match=rf"`path` {folder} is a directory"):
        calibrate(make_mlp(), make_batches(n=2), counting_loss, checkpoint=folder, progress=False)
    assert batches_seen == []
    # what the writer accepts, the reader resumes
    ckpt = tmp_path / "run.safetensors"
    calibrate(make_mlp(), make_batches(n=2), mlp_loss, checkpoint=ckpt, checkpoint_every=1, progress=False)
    resumed = calibrate(make_mlp(), make_batches(n=3), counting_loss, checkpoint=ckpt, progress=False)
    assert resumed.n_batches == 3 and len(batches_seen) == 1
