"""A killed tuning run resumes from its checkpoint, bit-identical to an uninterrupted one."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from validation.train import tune

STEPS = 12


class _Killed(RuntimeError):
    pass


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(6, 6))
    model.add_module("drop", torch.nn.Dropout(0.3))  # draws from the random state every step
    model.add_module("classifier", torch.nn.Linear(6, 3))
    model.body.bias.requires_grad_(False)  # a frozen parameter: not in the checkpoint
    return model


def _batches() -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(5)]


def _loss(kill_at: int | None = None):
    calls = {"n": 0}

    def loss(m, b):
        if kill_at is not None and calls["n"] == kill_at:
            raise _Killed
        calls["n"] += 1
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    return loss


def _tune(model, loss, **kw):
    return tune(model, _batches(), loss, steps=STEPS, lr=3e-2, seed=4, progress=False,
                head=["classifier"], head_lr=1e-1, **kw)


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("kill_at", [1, 7, STEPS - 1])
def test_killed_tuning_resumes_bit_identical(tmp_path, kill_at):
    reference = _model()
    expected = _tune(reference, _loss())
    path = tmp_path / "tune.safetensors"
    model = _model()
    with pytest.raises(_Killed):
        _tune(model, _loss(kill_at), checkpoint=path, checkpoint_every_s=0.0)
    assert path.is_file()  # saved after every step (every_s=0) up to the kill
    again = _model()  # a new process: the same start, then the checkpoint
    result = _tune(again, _loss(), checkpoint=path, checkpoint_every_s=0.0)
    assert result.resumed_from_step == kill_at
    assert result.losses == expected.losses  # the steps before the kill come from the file
    assert result.earlier_wall_time_s > 0.0
    for name, value in _state(reference).items():
        assert torch.equal(value, _state(again)[name]), name


def test_no_checkpoint_is_written_without_a_path_or_before_its_interval(tmp_path):
    path = tmp_path / "tune.safetensors"
    result = _tune(_model(), _loss(), checkpoint=path, checkpoint_every_s=1e9)
    assert not path.exists() and result.resumed_from_step is None


def test_the_last_checkpoint_is_one_step_before_the_end(tmp_path):
    # the finished result is the caller's to keep (and the file its to remove): the loop never
    # saves the end, so a leftover checkpoint resumes into one real step, not into nothing
    path = tmp_path / "tune.safetensors"
    _tune(_model(), _loss(), checkpoint=path, checkpoint_every_s=0.0)
    model = _model()
    result = _tune(model, _loss(), checkpoint=path, checkpoint_every_s=0.0)
    assert result.resumed_from_step == STEPS - 1  # the save after step STEPS - 1 of STEPS


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    path = tmp_path / "tune.safetensors"
    with pytest.raises(_Killed):
        _tune(_model(), _loss(5), checkpoint=path, checkpoint_every_s=0.0)
    reference = _model()
    expected = tune(reference, _batches(), _loss(), steps=STEPS, lr=1e-2, seed=4,
                    progress=False, head=["classifier"], head_lr=1e-1)
    model = _model()
    with pytest.warns(UserWarning, match="other tuning settings"):
        result = tune(model, _batches(), _loss(), steps=STEPS, lr=1e-2, seed=4, progress=False,
                      head=["classifier"], head_lr=1e-1, checkpoint=path)
    assert result.resumed_from_step is None and result.losses == expected.losses
    for name, value in _state(reference).items():
        assert torch.equal(value, _state(model)[name]), name


def test_runner_resumes_a_method_killed_while_tuning(tmp_path, monkeypatch):
    """The runner's checkpoint: a killed method resumes mid-tuning and ends as if never killed."""
    from validation import run_paper, train

    def patched_tune(kill_at: int | None):
        def run(model, batches, loss_fn, **kw):
            calls = itertools.count()

            def loss(m, b):
                if next(calls) == kill_at:
                    raise _Killed
                return loss_fn(m, b)

            return train.tune(model, batches, loss, **{**kw, "checkpoint_every_s": 0.0})

        return run

    def run_into(out, kill_at=None):
        monkeypatch.setattr(run_paper, "tune", patched_tune(kill_at))
        config = run_paper.run_config([
            "--preset", "smoke", "--parts", "language", "--methods", "LoRA@1.0", "--seeds", "0",
            "--steps", "5", "--jobs", "1", "--no-progress", "--out", str(out)])
        return run_paper.run(config)

    run_into(tmp_path / "reference")
    out = tmp_path / "killed"
    with pytest.raises(_Killed):
        run_into(out, kill_at=3)
    assert len(list((out / "checkpoints").glob("*.safetensors"))) == 1
    assert not list((out / "methods").glob("*LoRA*"))  # no record of the killed method
    run_into(out)
    (record,) = (out / "methods").glob("*LoRA*")
    (expected,) = (tmp_path / "reference" / "methods").glob("*LoRA*")
    assert record.name == expected.name  # the same settings key
    got, want = json.loads(record.read_text()), json.loads(expected.read_text())
    assert got["resumed_from_step"] == 3 and "resumed_from_step" not in want
    assert got["wall_time_s"] >= got["earlier_wall_time_s"] > 0.0
    for key in ("train_losses", "correct", "metrics"):
        assert got[key] == want[key], key
    assert not list((out / "checkpoints").glob("*"))  # removed once the record is written
