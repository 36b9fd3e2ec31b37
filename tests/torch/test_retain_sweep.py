"""One decomposition, several budgets: prepare_compression / PreparedCompression.compress / compress_many.

Each retain of a sweep must give what compress gives at that retain (the same
ranks, factors equal to rounding, the same report), while the layers are
decomposed once for the whole sweep.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from jactus_linalg.torch import (
    JactusConfig,
    PreparedCompression,
    calibrate,
    compress,
    compress_many,
    compress_then_lora,
    prepare_compression,
)

from ..numerics import tolerance
from .models import MODEL_FAMILIES, count_plan_layer_calls, mlp

# the module, not the function that `jactus_linalg.torch.compress` names
compress_module = importlib.import_module("jactus_linalg.torch.compress")
RETAINS = (0.6, 0.7, 0.8, 0.9)
MODELS = MODEL_FAMILIES


@pytest.fixture(scope="module")
def calibrated():
    out = {}
    for key, (make, batches, loss) in MODELS.items():
        model = make()
        out[key] = (model, calibrate(model, batches(), loss, progress=False))
    return out


def _assert_same_compression(a: torch.nn.Module, report_a, b: torch.nn.Module, report_b) -> None:
    """Same ranks, report numbers, trainable flags, and every tensor equal to rounding."""
    assert report_a.ranks == report_b.ranks
    assert report_a.params_after == report_b.params_after
    assert report_a.retain_achieved == report_b.retain_achieved
    assert [r.dense_core for r in report_a.layers] == [r.dense_core for r in report_b.layers]
    loss_a, loss_b = report_a.total_predicted_loss_increase, report_b.total_predicted_loss_increase
    assert (loss_a is None) == (loss_b is None)
    if loss_a is not None:
        assert loss_b == pytest.approx(loss_a, rel=tolerance(torch.float64, 1000), abs=0)
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, pa in params_a.items():
        pb = params_b[name]
        assert pa.shape == pb.shape and pa.dtype == pb.dtype, name
        assert pa.requires_grad == pb.requires_grad, name
        scale = max(float(pa.detach().abs().max()), 1.0)
        tol = tolerance(pa.dtype, max(pa.shape, default=1)) * scale
        assert float((pa.detach() - pb.detach()).abs().max()) <= tol, name


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["jactus", "svd-llm"])
def test_each_retain_of_a_prepared_compression_equals_compress(calibrated, kind, method):
    model, stats = calibrated[kind]
    prepared = prepare_compression(model, stats, method=method, progress=False)
    assert isinstance(prepared, PreparedCompression)
    for retain in RETAINS:
        ours = copy.deepcopy(model)
        report = prepared.compress(ours, retain=retain)
        theirs = copy.deepcopy(model)
        expected = compress(theirs, stats, retain=retain, method=method, progress=False)
        assert report.config == expected.config
        assert prepared.ranks(retain) == expected.ranks
        _assert_same_compression(ours, report, theirs, expected)
    # the sweep really changes the compression: the four budgets give four parameter counts
    counts = {prepared.ranks(r).__repr__() for r in RETAINS}
    assert len(counts) == len(RETAINS)


def test_compress_many_decomposes_each_layer_once(calibrated, monkeypatch):
    model, stats = calibrated["llama"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = count_plan_layer_calls(monkeypatch)
    results = compress_many(model, stats, RETAINS, JactusConfig(), progress=False)
    planned = len(calls)
    assert planned == len(stats.layers) > 0  # every layer once, for four retains
    calls.clear()
    single = copy.deepcopy(model)
    compress(single, stats, retain=RETAINS[0], progress=False)
    assert len(calls) == planned  # one retain costs the same decompositions as the sweep
    monkeypatch.undo()  # the real plan_layer for the references
    assert [r.config.retain for _, r in results] == list(RETAINS)
    for retain, (student, report) in zip(RETAINS, results, strict=True):
        reference = copy.deepcopy(model)
        expected = compress(reference, stats, retain=retain, progress=False)
        _assert_same_compression(student, report, reference, expected)
    after = model.state_dict()  # the model itself is left as it was
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_plan_fields_change_per_call(calibrated):
    model, stats = calibrated["vit"]
    prepared = prepare_compression(model, stats, JactusConfig(retain=0.7), progress=False)
    ours = copy.deepcopy(model)
    report = prepared.compress(ours, allocation="uniform", basis="whitened", dense_cores=False)
    theirs = copy.deepcopy(model)
    expected = compress(theirs, stats, retain=0.7, allocation="uniform", basis="whitened",
                        dense_cores=False, progress=False)
    assert report.config.retain == 0.7  # the prepared config's retain is the default
    _assert_same_compression(ours, report, theirs, expected)
    assert all(r.dense_core is None for r in report.layers)


def test_compressing_the_prepared_model_itself_equals_compress(calibrated):
    model, stats = calibrated["mlp"]
    own = copy.deepcopy(model)
    report = prepare_compression(own, stats, progress=False).compress(own, retain=0.7)
    theirs = copy.deepcopy(model)
    expected = compress(theirs, stats, retain=0.7, progress=False)
    _assert_same_compression(own, report, theirs, expected)


@pytest.mark.parametrize("retain", [0.7, 0.9])
def test_compress_then_lora_from_a_prepared_compression(calibrated, retain):
    model, stats = calibrated["llama"]
    prepared = prepare_compression(model, stats, method="svd-llm", progress=False)
    torch.manual_seed(0)  # the LoRA A matrices are random: the same draw for both
    ours = compress_then_lora(copy.deepcopy(model), stats, retain=retain, lora_rank=2,
                              progress=False, prepared=prepared)
    torch.manual_seed(0)
    theirs = compress_then_lora(copy.deepcopy(model), stats, retain=retain, lora_rank=2,
                                progress=False)
    assert ours.compress_retain == theirs.compress_retain
    _assert_same_compression(ours.model, ours.report, theirs.model, theirs.report)


def test_a_plan_field_cannot_change_after_preparing(calibrated):
    model, stats = calibrated["mlp"]
    prepared = prepare_compression(model, stats, progress=False)
    for field, value in (("method", "svd"), ("task_fraction", 0.0), ("damping", 0.5),
                         ("dtype", "float32"), ("grad_whitening", False)):
        with pytest.raises(ValueError, match=f"`{field}`.*prepare_compression again"):
            prepared.compress(copy.deepcopy(model), **{field: value})
    with pytest.raises(ValueError, match="`method`"):
        compress_then_lora(copy.deepcopy(model), stats, retain=0.8, lora_rank=1,
                           progress=False, prepared=prepared)  # its method is svd-llm
    with pytest.raises(ValueError, match="`retain`"):
        prepared.compress(copy.deepcopy(model), retain=1.5)
    with pytest.raises(TypeError, match="unknown JactusConfig field"):
        prepared.compress(copy.deepcopy(model), ranks=3)


def test_another_model_is_refused(calibrated):
    model, stats = calibrated["mlp"]
    prepared = prepare_compression(model, stats, progress=False)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[2].weight[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"layer `2`: its weight differs"):
        prepared.compress(changed)
    rebiased = copy.deepcopy(model)
    with torch.no_grad():
        rebiased[4].bias[0] += 1.0
    with pytest.raises(ValueError, match=r"layer `4`: its bias differs"):
        prepared.compress(rebiased)
    compressed = copy.deepcopy(model)
    prepared.compress(compressed, retain=0.6)
    with pytest.raises(ValueError, match="already compressed"):
        prepared.compress(compressed)
    with pytest.raises(ValueError, match="parameters"):
        prepared.compress(mlp(seed=0)[:3])
    with pytest.raises(TypeError, match=r"nn\.Module"):
        prepared.compress("model")


def test_compress_many_checks_every_retain_before_decomposing(calibrated, monkeypatch):
    model, stats = calibrated["mlp"]

    def refuse(*args, **kwargs):
        raise AssertionError("decomposed before the arguments were checked")

    monkeypatch.setattr(compress_module, "plan_layer", refuse)
    with pytest.raises(ValueError, match="`retains` is empty"):
        compress_many(model, stats, [], progress=False)
    with pytest.raises(ValueError, match="`retain` must lie in"):
        compress_many(model, stats, [0.8, 1.2], progress=False)


def _count_extraction_calls(monkeypatch) -> dict[str, int]:
    """Count the factor extraction's solves S^{-T} X (with an operator) and its QRs."""
    lowrank = importlib.import_module("jactus_linalg.lowrank")
    counts = {"solve": 0, "qr": 0}
    solve, qr_lowrank, qr_compress = (lowrank.inverse_transpose_times, lowrank.qr_reduced,
                                      compress_module.qr_reduced)

    def counted_solve(op, x):
        counts["solve"] += op is not None
        return solve(op, x)

    def counted(qr):
        def run(*args, **kwargs):
            counts["qr"] += 1
            return qr(*args, **kwargs)
        return run

    monkeypatch.setattr(lowrank, "inverse_transpose_times", counted_solve)
    monkeypatch.setattr(lowrank, "qr_reduced", counted(qr_lowrank))
    monkeypatch.setattr(compress_module, "qr_reduced", counted(qr_compress))
    return counts


@pytest.mark.parametrize("whitening", ["cholesky", "eigh"])
@pytest.mark.parametrize("dense_cores", [True, False])
@pytest.mark.parametrize("basis", ["orthonormal", "whitened"])
def test_the_sweep_solves_and_orthonormalizes_each_layer_once(calibrated, monkeypatch, basis,
                                                              dense_cores, whitening):
    """A PreparedCompression caches each layer's solved factors and their QRs at the break-even
    rank: over four retains every layer is solved (once per whitened side) and QR-factored (two
    QRs, where an orthonormal basis or a dense core needs them) once, and each retain's factors
    equal compress's at that retain to rounding. Without the cache they are computed per retain."""
    model, stats = calibrated["llama"]
    fields = {"basis": basis, "dense_cores": dense_cores, "whitening": whitening}
    prepared = prepare_compression(model, stats, progress=False, **fields)
    uncached = prepare_compression(model, stats, progress=False, **fields)
    uncached.cache_factors = False
    counts = _count_extraction_calls(monkeypatch)
    results = [(student := copy.deepcopy(model), prepared.compress(student, retain=retain))
               for retain in RETAINS]
    cached = dict(counts)
    counts.update(solve=0, qr=0)
    for retain in RETAINS:
        uncached.compress(copy.deepcopy(model), retain=retain)
    per_retain = dict(counts)
    monkeypatch.undo()
    plans = prepared.plan.plans
    factored = {r.name for _, rep in results for r in rep.layers if r.rank is not None}
    cored = {r.name for _, rep in results for r in rep.layers if r.dense_core is not None}
    needed = factored | cored
    assert factored and (cored or not dense_cores)
    sides = {n: (plans[n].grad_op is not None) + (plans[n].input_op is not None) for n in plans}
    assert cached["solve"] == sum(sides[n] for n in needed) > 0
    orthonormalized = cored | (factored if basis == "orthonormal" else set())
    assert cached["qr"] == 2 * len(orthonormalized)
    # the counters see the per-retain work of the path without the cache
    assert per_retain["solve"] > cached["solve"]
    assert per_retain["qr"] > cached["qr"] or not orthonormalized
    for retain, (student, report) in zip(RETAINS, results, strict=True):
        reference = copy.deepcopy(model)
        expected = compress(reference, stats, retain=retain, progress=False, **fields)
        _assert_same_compression(student, report, reference, expected)


def test_compress_many_slices_the_cache_from_the_first_retain(calibrated, monkeypatch):
    """compress_many goes through the cache too: with dense cores (the default) every planned
    layer needs its factors at every retain, so four retains make the solves and QRs of one
    (decomposition included), and each retain still equals compress."""
    model, stats = calibrated["vit"]
    counts = _count_extraction_calls(monkeypatch)
    compress_many(model, stats, RETAINS[:1], progress=False)
    one = dict(counts)
    counts.update(solve=0, qr=0)
    results = compress_many(model, stats, RETAINS, progress=False)
    monkeypatch.undo()
    assert counts == one and one["solve"] > 0 and one["qr"] > 0
    for retain, (student, report) in zip(RETAINS, results, strict=True):
        reference = copy.deepcopy(model)
        _assert_same_compression(student, report, reference,
                                 compress(reference, stats, retain=retain, progress=False))
