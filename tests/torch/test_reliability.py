"""Reliability of the torch adapter: each failure users of SVD-LLM, CorDA and ASVD hit, reproduced.

Bad statistics (dead units, fewer tokens than features, layers that get no
gradient), half precision, non-finite values, interruption, untrusted
files, determinism (one process and two) and API misuse. Each test builds
the failure on a small model and asserts what the package does about it;
``docs/failure-modes.md`` lists them. The core-level cases are in
``tests/test_reliability.py``.

The models here are built in this file (no ``transformers``), so the
spawned processes of the two-process test start quickly.
"""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn

from jactus_linalg.torch import (
    CalibrationStats,
    JactusLinear,
    calibrate,
    compress,
    load_compressed,
    mark_trainable,
    plan_compression,
    replace_layers,
    save_compressed,
)
from jactus_linalg.torch import stats as jstats
from jactus_linalg.torch.compress import allocate

from ..numerics import tolerance

IN, HIDDEN, OUT = 12, 32, 3


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Targets ``0`` (12 -> 32), ``2`` (32 -> 32), ``4`` (32 -> 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, OUT),
    ).to(dtype)


def _batches(
    n: int = 4, size: int = 24, seed: int = 1, dead: int | None = None, dtype=torch.float64
):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, IN, generator=g, dtype=torch.float64)
        if dead is not None:
            x[:, dead] = 0.0  # a dead input unit: this feature is never active
        out.append((x.to(dtype), torch.randint(0, OUT, (size,), generator=g)))
    return out


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


def _report(report, name: str):
    return next(r for r in report.layers if r.name == name)


def _stat_tensors(stats: CalibrationStats) -> dict[str, torch.Tensor]:
    out = {f"input/{k}": a.total for k, a in stats.inputs.items()}
    out |= {f"grad/{k}": a.total for k, a in stats.grads.items()}
    out |= {f"grad_sum/{k}": t for k, t in stats.grad_sums.items()}
    return out


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _rewrite_safetensors_header(path, edit) -> None:
    """Edit the JSON header of a safetensors file in place (the data bytes are kept)."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


# --- covariances: singular, near-singular, zero gradient --------------------------


@pytest.mark.parametrize("whitening", ["cholesky", "eigh"])
def test_dead_input_unit_is_damped_and_reported(whitening):
    """Feature 3 is zero in every batch, so C_x is exactly singular.

    Damping makes it invertible, and the report says so.
    """
    model, batches = _mlp(), _batches(dead=3)
    stats = calibrate(model, batches, _loss, progress=False)
    cx = stats.layer("0").input_cov
    assert torch.all(cx[3] == 0) and torch.all(cx[:, 3] == 0)
    compressed = copy.deepcopy(model)
    report = compress(compressed, stats, retain=0.7, whitening=whitening, progress=False)
    assert torch.isfinite(compressed(batches[0][0])).all()
    info = _report(report, "0").input_whitening
    mean_diag = torch.diagonal(cx).mean().item()
    assert info.relative_damping == 1e-3
    assert info.damping == pytest.approx(1e-3 * mean_diag, rel=tolerance(torch.float64, IN))
    # the dead direction adds nothing: at most IN - 1 directions are resolved
    assert info.effective_rank <= IN - 1 + tolerance(torch.float64, IN)
    if whitening == "eigh":
        assert info.numerical_rank == IN - 1
        assert any(f"rank {IN - 1} of {IN}" in note for note in _report(report, "0").notes)
    # asking for no damping is a clear error, naming the layer and what to do
    with pytest.raises(
        ValueError, match=r"layer `0`: `input_cov` is singular .*damping=0.*Raise `damping`"
    ):
        compress(
            copy.deepcopy(model),
            stats,
            retain=0.7,
            damping=0.0,
            whitening=whitening,
            progress=False,
        )


def test_fewer_tokens_than_features_still_compresses():
    """Five calibration tokens for 12 and 32 features: every covariance is rank <= 5."""
    model, batches = _mlp(), _batches(n=1, size=5)
    stats = calibrate(model, batches, _loss, progress=False)
    compressed = copy.deepcopy(model)
    report = compress(compressed, stats, retain=0.6, progress=False)
    assert torch.isfinite(compressed(batches[0][0])).all()
    for layer in report.layers:
        for info in (layer.input_whitening, layer.grad_whitening):
            assert info.damping > 0
            assert info.effective_rank <= 5 + tolerance(torch.float64, HIDDEN)
    assert report.total_predicted_loss_increase is not None
    assert all(r.predicted_loss_increase >= 0 for r in report.layers)


class _Branches(nn.Module):
    """The gradient of ``b`` is zero (``mode="zero"``) or never computed (``"detached"``)."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.a, self.b, self.c = (
            nn.Linear(IN, HIDDEN),
            nn.Linear(HIDDEN, HIDDEN),
            nn.Linear(HIDDEN, OUT),
        )
        self.double()

    def forward(self, x):
        h = torch.relu(self.a(x))
        side = self.b(h)
        if self.mode == "zero":
            return self.c(h) + 0.0 * side.sum(-1, keepdim=True)
        return self.c(h)  # `side` does not reach the loss


@pytest.mark.parametrize(
    ("mode", "why"), [("zero", "identically zero"), ("detached", "never computed")]
)
def test_layer_without_gradient_gets_a_clear_error(mode, why):
    """No gradient reached layer `b`: gradient-weighted methods refuse it and say what to do."""
    model, batches = _Branches(mode), _batches()
    stats = calibrate(model, batches, _loss, progress=False)
    for method in ("jactus", "kfac"):
        with pytest.raises(
            ValueError, match=rf"layer `b`: no loss gradient.*{why}.*`exclude=`.*svd-llm"
        ):
            compress(copy.deepcopy(model), stats, retain=0.7, method=method, progress=False)
    # methods that use no gradient still work; the report says what is missing
    for method in ("svd-llm", "svd"):
        compressed = copy.deepcopy(model)
        report = compress(compressed, stats, retain=0.7, method=method, progress=False)
        assert torch.isfinite(compressed(batches[0][0])).all()
        b = _report(report, "b")
        assert b.predicted_loss_increase is None and b.grad_whitening is None
        assert any("no loss gradient" in note for note in b.notes)
    # the advice works: excluded, `b` stays dense and JACTUS compresses the rest
    stats = calibrate(model, batches, _loss, exclude=["b"], progress=False)
    compressed = copy.deepcopy(model)
    compress(compressed, stats, retain=0.8, progress=False)
    assert type(compressed.b) is nn.Linear and isinstance(compressed.a, JactusLinear)


def test_layer_never_called_gets_advice():
    """A target the forward pass never calls has no statistics; the error says to exclude it."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.c = (
                nn.Linear(IN, HIDDEN),
                nn.Linear(HIDDEN, HIDDEN),
                nn.Linear(HIDDEN, OUT),
            )
            self.double()

        def forward(self, x):
            return self.c(torch.relu(self.a(x)))

    model = Unused()
    stats = calibrate(model, _batches(), _loss, progress=False)
    assert "unused" not in stats
    with pytest.raises(ValueError, match=r"\['unused'\].*never called.*`exclude=`"):
        compress(copy.deepcopy(model), stats, retain=0.8, progress=False)


# --- half precision -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_calibrates_and_compresses(dtype):
    """Statistics in float64, decompositions upcast, factors rounded to the model's dtype once.

    Input features spread over three decades make the whitening factors
    ill-conditioned: rounding them to float16 *before* orthonormalising
    (as the adapter once did) gave about 10 eps of error; 3 eps is allowed here.
    """
    spread = torch.logspace(0, -3, IN, dtype=torch.float64)
    batches = [((x * spread).to(dtype), y) for x, y in _batches()]
    model = _mlp(dtype=dtype)
    stats = calibrate(model, batches, _loss, progress=False)
    for name in stats:
        layer = stats.layer(name)
        assert (
            layer.input_cov.dtype == layer.grad_cov.dtype == layer.grad_mean.dtype == torch.float64
        )
    plan = plan_compression(model, stats, progress=False)
    ranks = allocate(plan, 0.7)
    compressed = copy.deepcopy(model)
    replace_layers(compressed, plan, ranks, retain=0.7)
    assert torch.isfinite(compressed(batches[0][0])).all()
    for name, rank in ranks.items():
        if rank is None:
            continue
        layer = compressed.get_submodule(name)
        assert all(p.dtype == dtype for p in layer.parameters())
        # the stored product differs from the working-precision one by rounding only:
        # relative error a few eps(dtype), not eps(dtype) times a condition number
        lp = plan.plans[name]
        exact = lp._replace(weight_dtype=lp.core.dtype).factorize(rank)
        want = exact.left @ exact.core @ exact.right.T
        got = (
            layer.left_proj.weight.double()
            @ layer.core.weight.double()
            @ layer.right_proj.weight.double()
        )
        assert (got - want).norm() <= tolerance(dtype, 3, c=1) * want.norm()


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_fp16_activation_overflow_names_the_layer():
    """An activation past 65504 is Inf in float16.

    The next target's hook names the layer and its `input_cov`.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), _Scale(1e5), nn.Linear(HIDDEN, OUT)).half()
    batches = _batches(n=1, dtype=torch.float16)
    with pytest.raises(
        ValueError, match=r"layer `2`.*`2:input_cov`.*Inf.*float16.*65504.*float32 copy"
    ):
        calibrate(model, batches, _loss, progress=False)
    # the model is left as it was (flags and grads restored)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_fp16_gradient_overflow_names_the_layer():
    """A gradient past 65504 is Inf in float16.

    The hook of the layer it reaches names the layer and its `grad_cov`.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(IN, HIDDEN, bias=False), _Scale(1e4), nn.Linear(HIDDEN, OUT, bias=False)
    ).half()
    x = (1e-4 * torch.randn(8, IN)).half()  # forward stays small: |Scale(a(x))| ~ 1

    def big_loss(m, batch):
        return m(batch).float().sum() * 1e3  # d loss / d out = 1e3; times 1e4 at the Scale: Inf

    with pytest.raises(ValueError, match=r"layer `0`, output gradient.*`0:grad_cov`.*Inf.*float16"):
        calibrate(model, [x], big_loss, progress=False)


def test_fp16_gradient_underflow_is_explained():
    """Gradients below float16's smallest subnormal (6e-8) vanish.

    The error says so, and to scale the loss up.
    """
    model, batches = _mlp(dtype=torch.float16), _batches(dtype=torch.float16)
    stats = calibrate(model, batches, lambda m, b: 2.0**-30 * _loss(m, b), progress=False)
    with pytest.raises(
        ValueError,
        match=r"layer `0`: no loss gradient.*identically zero.*"
        r"float16, small gradients underflow.*loss multiplied by a large constant",
    ):
        compress(copy.deepcopy(model), stats, retain=0.7, progress=False)


def test_loss_scale_does_not_change_the_compression():
    """Scaling the loss by s scales C_g by s^2 and G by s: same ranks, same weights, loss x s^2."""
    model, batches = _mlp(), _batches()
    scale = 2.0**10
    plain = calibrate(model, batches, _loss, progress=False)
    scaled = calibrate(model, batches, lambda m, b: scale * _loss(m, b), progress=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = compress(a, plain, retain=0.7, progress=False)
    rb = compress(b, scaled, retain=0.7, progress=False)
    assert ra.ranks == rb.ranks
    for name, rank in ra.ranks.items():
        wa, wb = a.get_submodule(name).weight, b.get_submodule(name).weight
        cond = 1.0 if rank is None else 1e3  # damping 1e-3 bounds the factors' conditioning
        assert (wa - wb).abs().max() <= tolerance(torch.float64, HIDDEN, cond=cond) * wa.abs().max()
    assert rb.total_predicted_loss_increase == pytest.approx(
        scale**2 * ra.total_predicted_loss_increase, rel=tolerance(torch.float64, HIDDEN, cond=1e3)
    )


# --- non-finite values ------------------------------------------------------------


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_nonfinite_gradient_names_layer_and_statistic():
    model = _mlp()

    def loss(m, batch):
        x, y = batch
        h = m[1](m[0](x))
        out = m[4](m[3](m[2](_NanGrad.apply(h))))  # NaN flows back into layer 0's output
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(ValueError, match=r"layer `0`, output gradient.*`0:grad_cov`.*NaN"):
        calibrate(model, _batches(n=1), loss, progress=False)


def test_nonfinite_activation_names_layer_and_statistic():
    """NaN in the data reaching layer `2` (from outside the targets) names `2:input_cov`."""
    model = _mlp()

    def loss(m, batch):
        x, y = batch
        h = m[1](m[0](x))
        h = h.clone()
        h[0, 0] = float("nan")
        return nn.functional.cross_entropy(m[4](m[3](m[2](h))).nan_to_num(), y)

    with pytest.raises(ValueError, match=r"layer `2`, input activations.*`2:input_cov`.*1 NaN"):
        calibrate(model, _batches(n=1), loss, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weight_is_refused_naming_the_layer(value):
    """Calibrate and compress refuse a target whose weight or bias is not finite.

    Nothing is substituted and no layer is replaced.
    """
    model, batches = _mlp(), _batches()
    stats = calibrate(model, batches, _loss, progress=False)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[2].weight[1, 1] = value
    with pytest.raises(ValueError, match=r"layer `2`: `weight` contains non-finite values"):
        calibrate(bad, batches, _loss, progress=False)
    with pytest.raises(ValueError, match=r"layer `2`: `weight` contains non-finite values"):
        compress(bad, stats, retain=0.7, progress=False)
    assert not any(isinstance(m, JactusLinear) for m in bad.modules())  # nothing was replaced
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[4].bias[0] = value
    with pytest.raises(ValueError, match=r"layer `4`: `bias` contains non-finite values"):
        compress(bad, stats, retain=0.7, progress=False)


def test_half_precision_factor_overflow_is_refused():
    """Whitened factors S^-T U can exceed float16's range: refused by name, never stored as Inf."""
    model, batches = _mlp(), _batches()
    tiny = calibrate(model, batches, lambda m, b: 1e-6 * _loss(m, b), progress=False)  # C_g ~ 1e-12
    half = model.half()
    with pytest.raises(
        ValueError,
        match=r"layer `\d`: the rank-\d+ `left` factor overflows.*float16.*basis='orthonormal'",
    ):
        compress(copy.deepcopy(half), tiny, retain=0.7, basis="whitened", progress=False)
    compressed = copy.deepcopy(half)
    compress(compressed, tiny, retain=0.7, progress=False)  # orthonormal factors are bounded
    assert all(torch.isfinite(p).all() for p in compressed.parameters())


# --- interruption ------------------------------------------------------------------


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("mode", ["gram", "qr"])
def test_killed_calibration_resumes_bit_identical(tmp_path, mode):
    """Killed at batch 3 (checkpoint every 2), then resumed.

    Statistics and factors equal those of an uninterrupted run, bit for bit.
    """
    batches = _batches(n=5)
    full = calibrate(_mlp(), batches, _loss, mode=mode, progress=False)
    ckpt = tmp_path / "calib.safetensors"

    def dies_at_3(model, batch):
        if batch is batches[3]:
            raise _Killed("killed at batch 3")
        return _loss(model, batch)

    with pytest.raises(_Killed):
        calibrate(
            _mlp(),
            batches,
            dies_at_3,
            mode=mode,
            checkpoint=ckpt,
            checkpoint_every=2,
            progress=False,
        )
    assert CalibrationStats.load(ckpt).n_batches == 2  # the last completed checkpoint
    resumed = calibrate(
        _mlp(), batches, _loss, mode=mode, checkpoint=ckpt, checkpoint_every=2, progress=False
    )
    assert resumed.n_batches == full.n_batches == 5
    assert {k: a.count for k, a in resumed.inputs.items()} == {
        k: a.count for k, a in full.inputs.items()
    }
    _assert_bit_identical(_stat_tensors(full), _stat_tensors(resumed))
    a, b = _mlp(), _mlp()
    compress(a, full, retain=0.7, progress=False)
    compress(b, resumed, retain=0.7, progress=False)
    _assert_bit_identical(a.state_dict(), b.state_dict())


def test_resume_with_other_arguments_is_refused(tmp_path):
    """A checkpoint resumes only the calibration that wrote it.

    Mixing two calibrations would corrupt the statistics silently.
    """
    ckpt = tmp_path / "calib.safetensors"
    calibrate(_mlp(), _batches(n=2), _loss, checkpoint=ckpt, checkpoint_every=1, progress=False)
    with pytest.raises(
        ValueError, match=r"written with targets='all-linear'.*targets=\['2'\].*same arguments"
    ):
        calibrate(_mlp(), _batches(n=4), _loss, targets=["2"], checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match=r"written with mode='gram'"):
        calibrate(_mlp(), _batches(n=4), _loss, mode="qr", checkpoint=ckpt, progress=False)


def test_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    """CalibrationStats.save is atomic.

    Killed mid-write, the old checkpoint is intact and no temp file is left.
    """
    ckpt = tmp_path / "calib.safetensors"
    first = calibrate(_mlp(), _batches(n=2), _loss, progress=False)
    first.save(ckpt)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(jstats, "save_file", crash)
    second = calibrate(_mlp(), _batches(n=3), _loss, progress=False)
    with pytest.raises(KeyboardInterrupt):
        second.save(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors"]
    _assert_bit_identical(_stat_tensors(CalibrationStats.load(ckpt)), _stat_tensors(first))


# --- untrusted files ----------------------------------------------------------------


@pytest.fixture
def saved_stats(tmp_path):
    stats = calibrate(_mlp(), _batches(n=2), _loss, progress=False)
    return stats, stats.save(tmp_path / "stats.safetensors")


def test_stats_load_refuses_pickles(tmp_path, saved_stats):
    stats, _ = saved_stats
    pickled = tmp_path / "stats.pt"
    torch.save(_stat_tensors(stats), pickled)
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        CalibrationStats.load(pickled)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(ValueError, match=r"not a valid safetensors file.*corrupted"):
        CalibrationStats.load(disguised)


def test_stats_load_refuses_tampered_shape(saved_stats):
    """A tensor reshaped in the header (same bytes) no longer fits its layer: refused."""
    _, path = saved_stats

    def reshape(header):
        header["input/0"]["shape"] = [IN // 2, IN * 2]

    _rewrite_safetensors_header(path, reshape)
    with pytest.raises(
        ValueError, match=rf"tensor `input/0`.*shape \[{IN // 2}, {IN * 2}\].*needs \[{IN}, {IN}\]"
    ):
        CalibrationStats.load(path)


def test_stats_load_refuses_tampered_layer_table(saved_stats):
    _, path = saved_stats

    def widen(header):
        meta = json.loads(header["__metadata__"]["jactus"])
        meta["layers"][1]["in_features"] += 1
        header["__metadata__"]["jactus"] = json.dumps(meta)

    _rewrite_safetensors_header(path, widen)
    with pytest.raises(ValueError, match=r"(tensor `\w+/2`.*shape|input group).*"):
        CalibrationStats.load(path)

    def garble(header):
        header["__metadata__"]["jactus"] = '{"format": "jactus_linalg.calibration/1", "layers": 3'

    _rewrite_safetensors_header(path, garble)
    with pytest.raises(ValueError, match=r"malformed jactus calibration header.*not JSON"):
        CalibrationStats.load(path)


def test_header_claiming_a_huge_shape_is_refused(tmp_path, saved_stats):
    """A header that claims a 10^6 x 10^6 tensor is refused from the header alone.

    Nothing is allocated, and the model is untouched.
    """
    _, path = saved_stats

    def huge(header):
        start = header["input/0"]["data_offsets"][0]
        header["input/0"]["shape"] = [10**6, 10**6]
        header["input/0"]["data_offsets"] = [start, start + 8 * 10**12]

    _rewrite_safetensors_header(path, huge)
    with pytest.raises(ValueError, match=r"not a valid safetensors file"):
        CalibrationStats.load(path)
    # the same for a compressed model: refused before any tensor reaches the model
    model, batches = _mlp(), _batches()
    compress(model, calibrate(model, batches, _loss, progress=False), retain=0.7, progress=False)
    folder = save_compressed(model, tmp_path / "m")
    key = next(k for k in model.state_dict() if k.endswith("core.weight"))

    def huge_core(header):
        start = header[key]["data_offsets"][0]
        header[key]["shape"] = [10**6, 10**6]
        header[key]["data_offsets"] = [start, start + 8 * 10**12]

    _rewrite_safetensors_header(folder / "model.safetensors", huge_core)
    target = _mlp(seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        load_compressed(folder, model=target)
    _assert_bit_identical(before, target.state_dict())


def test_tampered_dtype_or_config_is_refused(tmp_path):
    """jactus.json records every dtype.

    A tensor relabelled in the header (same bytes) or a garbled config is refused.
    """
    model, batches = _mlp(dtype=torch.float32), _batches(dtype=torch.float32)
    compress(model, calibrate(model, batches, _loss, progress=False), retain=0.7, progress=False)
    folder = save_compressed(model, tmp_path / "m")
    key = next(k for k in model.state_dict() if k.endswith("core.weight"))

    def relabel(header):
        header[key]["dtype"] = "I32"  # same width as F32

    _rewrite_safetensors_header(folder / "model.safetensors", relabel)
    target = _mlp(seed=4, dtype=torch.float32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"tensor `{key}`.*dtype I32.*records 'float32'"):
        load_compressed(folder, model=target)
    _assert_bit_identical(before, target.state_dict())
    folder = save_compressed(model, tmp_path / "m")
    (folder / "jactus.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"jactus\.json is not valid JSON"):
        load_compressed(folder, model=target)
    config = {
        "format": "jactus_linalg.model/1",
        "architecture": "Sequential",
        "layers": {"0": {"core": "x"}},
        "shapes": {},
        "dtypes": {},
    }
    (folder / "jactus.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"malformed record for layer `0`"):
        load_compressed(folder, model=target)
    _assert_bit_identical(before, target.state_dict())


# --- determinism ----------------------------------------------------------------------


def test_same_seed_and_data_give_bit_identical_statistics_and_factors():
    """Calibrating twice and compressing twice in one process.

    Every statistic and every factor is bit-identical.
    """
    batches = _batches()
    one = calibrate(_mlp(), batches, _loss, progress=False)
    two = calibrate(_mlp(), batches, _loss, progress=False)
    _assert_bit_identical(_stat_tensors(one), _stat_tensors(two))
    for method in ("jactus", "svd-llm"):
        a, b = _mlp(), _mlp()
        ra = compress(a, one, retain=0.7, method=method, progress=False)
        rb = compress(b, two, retain=0.7, method=method, progress=False)
        assert ra.ranks == rb.ranks
        _assert_bit_identical(a.state_dict(), b.state_dict())


def _two_process_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = calibrate(_mlp(), _batches(n=4)[rank::world], _loss, progress=False)
        model = _mlp()
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
    _assert_bit_identical(_stat_tensors(s0), _stat_tensors(s1))
    _assert_bit_identical(m0, m1)
    # one process over the same data: the same sums in another order, so equal to rounding
    single = calibrate(_mlp(), _batches(n=4), _loss, progress=False)
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


# --- API misuse -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated_mlp():
    model = _mlp()
    return model, calibrate(model, _batches(), _loss, progress=False)


def test_misuse_errors_say_what_to_do(calibrated_mlp, tmp_path):
    """Each misuse names the problem and the fix."""
    model, stats = calibrated_mlp
    done = copy.deepcopy(model)
    compress(done, stats, retain=0.7, progress=False)
    with pytest.raises(ValueError, match=r"already compressed.*compress the original dense model"):
        compress(done, stats, retain=0.7, progress=False)
    with pytest.raises(
        ValueError, match=r"already compressed.*calibrate and compress the original dense model"
    ):
        calibrate(done, _batches(), _loss, progress=False)
    other = nn.Sequential(
        nn.Linear(IN, 16), nn.GELU(), nn.Linear(16, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT)
    ).double()
    with pytest.raises(ValueError, match=r"statistics from another model.*calibrate this model"):
        compress(other, stats, retain=0.7, progress=False)
    with pytest.raises(
        ValueError, match=r"matched no nn.Linear.*include: 0, 2, 4.*Pass 'all-linear'"
    ):
        calibrate(
            copy.deepcopy(model), _batches(), _loss, targets=r"layers\.\d+\.q_proj", progress=False
        )
    with pytest.raises(ValueError, match=r"`retain`=0.01 is too small.*raise `retain`"):
        compress(copy.deepcopy(model), stats, retain=0.01, progress=False)
    with pytest.raises(ValueError, match=r"no JactusLinear.*save a compressed model"):
        save_compressed(copy.deepcopy(model), tmp_path / "m")
    with pytest.raises(ValueError, match=r"compress it first"):
        mark_trainable(copy.deepcopy(model))
    folder = save_compressed(done, tmp_path / "m")
    with pytest.raises(
        ValueError,
        match=r"holds a Sequential but `model` is a Linear: pass a freshly constructed Sequential",
    ):
        load_compressed(folder, model=nn.Linear(2, 2))
