"""Importing the core is torch-free; the public names of DESIGN.md exist."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import jactus_linalg as jl


def test_import_does_not_import_torch():
    code = (
        "import sys, jactus_linalg; "
        "bad = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_core_uses_torch_only_through_arrays():
    """Calling the core on numpy arrays never imports torch either."""
    code = (
        "import sys, numpy as np, jactus_linalg as jl; "
        "w = np.random.default_rng(0).standard_normal((6, 4)); "
        "c = np.cov(np.random.default_rng(1).standard_normal((4, 20))); "
        "jl.projected_lowrank(w, 2, input_cov=c); "
        "jl.jactus_layer(w, 2, input_cov=c, grad_mean=w, task_directions='gradient'); "
        "jl.whiten(c, method='eigh'); jl.union_of_subspaces(w); "
        "assert 'torch' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["projected_lowrank", "whiten", "union_of_subspaces", "allocate_ranks"])
def test_public_core_names(name):
    assert callable(getattr(jl, name))
    assert name in jl.__all__


def test_public_adapter_names():
    pytest.importorskip("torch")
    from jactus_linalg.torch import calibrate, compress

    assert callable(calibrate) and callable(compress)


def test_signatures_match_design():
    sig = inspect.signature(jl.projected_lowrank)
    params = sig.parameters
    assert list(params)[:2] == ["weight", "rank"]
    assert params["rank"].default is None
    for kw in ("input_cov", "grad_cov", "left", "right", "damping", "xp"):
        assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY
    for kw in ("input_cov", "grad_cov", "left", "right", "xp"):
        assert params[kw].default is None

    params = inspect.signature(jl.whiten).parameters
    assert next(iter(params)) == "cov"
    assert params["damping"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["method"].default == "eigh"

    params = inspect.signature(jl.union_of_subspaces).parameters
    assert params["bases"].kind is inspect.Parameter.VAR_POSITIONAL
    assert params["rtol"].default is None

    assert list(inspect.signature(jl.allocate_ranks).parameters) == ["gains", "costs", "budget"]


def test_results_are_namedtuples_with_design_fields():
    import numpy as np

    w = np.random.default_rng(0).standard_normal((5, 4))
    res = jl.projected_lowrank(w, 2)
    assert isinstance(res, tuple) and hasattr(res, "_fields")
    assert res._fields[:3] == ("left", "core", "right")
    wh = jl.whiten(np.eye(3))
    for field in ("factor", "inverse", "damping"):
        assert field in wh._fields
    assert "basis" in jl.union_of_subspaces(w)._fields
    ranks = jl.allocate_ranks([np.ones(2)], [np.ones(2)], 0.5)
    assert isinstance(ranks, list) and all(type(r) is int for r in ranks)
