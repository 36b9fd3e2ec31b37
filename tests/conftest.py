"""Shared fixtures: the array namespace under test and Hypothesis profiles.

``xp`` runs a test on numpy, array-api-strict and torch (CPU); the
``xp_cuda`` variant runs on torch CUDA and skips itself without a GPU.
Profiles: ``ci`` (derandomized, no deadline; the default) and ``dev``
(random, more examples): choose with ``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _torch_or_skip():
    return pytest.importorskip("torch")


class Backend:
    """An array namespace plus how to move numpy data into and out of it."""

    def __init__(self, name: str):
        self.name = name
        if name == "numpy":
            import array_api_compat.numpy as xp

            self.xp = xp
            self.device = None
        elif name == "array_api_strict":
            import array_api_strict as xp

            self.xp = xp
            self.device = None
        elif name.startswith("torch"):
            torch = _torch_or_skip()
            import array_api_compat.torch as xp

            self.xp = xp
            self.device = torch.device("cuda" if name == "torch_cuda" else "cpu")
            if name == "torch_cuda" and not torch.cuda.is_available():
                pytest.skip("CUDA is not available on this machine")
        else:  # pragma: no cover
            raise ValueError(name)

    def asarray(self, a, dtype=None):
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
        if self.name.startswith("torch"):
            import torch

            return torch.as_tensor(a, device=self.device)
        return self.xp.asarray(a)

    def to_numpy(self, a) -> np.ndarray:
        from jactus_linalg._backend import as_numpy

        return np.asarray(as_numpy(a), dtype=np.float64)

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=["numpy", "array_api_strict", "torch"])
def backend(request) -> Backend:
    return Backend(request.param)


@pytest.fixture
def backend_cuda() -> Backend:
    return Backend("torch_cuda")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20260528)
