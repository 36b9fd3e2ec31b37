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
