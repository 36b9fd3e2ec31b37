"""Hypothesis strategies: shapes, spectra and matrices with known spectra."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from .numerics import covariance_with_spectrum, spectrum, with_spectrum

seeds = st.integers(min_value=0, max_value=2**32 - 1)
spectrum_kinds = st.sampled_from(["decaying", "stepped", "rank", "flat"])


@st.composite
def shapes(draw, min_side: int = 2, max_side: int = 24):
    m = draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_side, max_side))
    return m, n


@st.composite
def weights(draw, max_side: int = 24, max_cond: float = 1e6):
    """``(W, sigma)``: a weight with a drawn shape and known singular values."""
    m, n = draw(shapes(max_side=max_side))
    k = min(m, n)
    kind = draw(spectrum_kinds)
    cond = draw(st.floats(1.0, max_cond))
    scale = draw(st.floats(1e-3, 1e3))
    sigma = scale * spectrum(kind, k, cond=cond, rank=draw(st.integers(1, k)))
    rng = np.random.default_rng(draw(seeds))
    return with_spectrum(rng, m, n, sigma), sigma


@st.composite
def covariances(draw, n: int, max_cond: float = 1e12, allow_singular: bool = True):
    """``(C, eigenvalues)``: PSD covariance with a known spectrum, cond up to ``max_cond``."""
    kinds = ["decaying", "stepped", "flat"] + (["rank"] if allow_singular else [])
    kind = draw(st.sampled_from(kinds))
    cond = draw(st.floats(1.0, max_cond))
    scale = draw(st.floats(1e-4, 1e4))
    lam = scale * spectrum(kind, n, cond=cond, rank=draw(st.integers(1, n)))
    rng = np.random.default_rng(draw(seeds))
    return covariance_with_spectrum(rng, lam), lam


@st.composite
def layer_problems(
    draw,
    max_side: int = 16,
    max_cond: float = 1e12,
    with_grad_cov: bool = True,
    allow_singular: bool = True,
):
    """A layer with known spectra: ``dict(W, sigma, Cx, Cg, G, rank)``.

    ``Cx`` and ``Cg`` come from :func:`covariances` (condition numbers up to
    ``max_cond``, possibly exactly rank deficient); ``G`` has a drawn rank.
    """
    w, sigma = draw(weights(max_side=max_side))
    m, n = w.shape
    cx, _ = draw(covariances(n, max_cond=max_cond, allow_singular=allow_singular))
    cg = None
    if with_grad_cov:
        cg, _ = draw(covariances(m, max_cond=max_cond, allow_singular=allow_singular))
    g_rank = draw(st.integers(1, min(m, n)))
    rng = np.random.default_rng(draw(seeds))
    g = with_spectrum(rng, m, n, np.geomspace(1.0, 1e-2, g_rank) * draw(st.floats(1e-3, 1e3)))
    rank = draw(st.integers(1, min(m, n)))
    return {"W": w, "sigma": sigma, "Cx": cx, "Cg": cg, "G": g, "rank": rank}


@st.composite
def concave_instances(draw, max_layers: int = 3, max_units: int = 4):
    """Per-layer ``(gains, costs)`` with non-increasing gain/cost ratios (concave prefixes).

    Gains are non-increasing and costs non-decreasing, like real rank units
    (``σ²`` gains, ``m + n + 2r + 1`` costs). Values are generic (distinct).
    """
    n_layers = draw(st.integers(1, max_layers))
    gains, costs = [], []
    for _ in range(n_layers):
        units = draw(st.integers(1, max_units))
        g = np.sort(
            np.array(draw(st.lists(st.floats(0.01, 100.0), min_size=units, max_size=units)))
        )[::-1]
        base = draw(st.floats(1.0, 20.0))
        step = draw(st.floats(0.0, 3.0))
        gains.append(g.copy())
        costs.append(base + step * np.arange(units))
    return gains, costs


@st.composite
def unit_instances(draw, max_layers: int = 3, max_units: int = 5):
    """Per-layer ``(gains, costs)`` with arbitrary (possibly rising) ratios."""
    n_layers = draw(st.integers(1, max_layers))
    gains, costs = [], []
    for _ in range(n_layers):
        units = draw(st.integers(1, max_units))
        gain = st.one_of(st.just(0.0), st.floats(1e-3, 100.0))  # exact zeros: dead units
        gains.append(np.array(draw(st.lists(gain, min_size=units, max_size=units))))
        costs.append(
            np.array(draw(st.lists(st.floats(0.5, 20.0), min_size=units, max_size=units)))
        )
    return gains, costs
