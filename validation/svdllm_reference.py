"""SVD-LLM's per-layer compression, transcribed for side-by-side checks.

Source: AIoT-MLSys-Lab/SVD-LLM, ``SVDLLM.py`` (Wang et al., "SVD-LLM:
Truncation-aware Singular Value Decomposition for Large Language Model
Compression", ICLR 2025):

* ``profle_svdllm``: the Gram matrix ``XᵀX`` of a layer's inputs (summed
  over tokens in float32), ``.double()``, then ``torch.linalg.cholesky``; if
  that raises, ``torch.linalg.eigvalsh`` and the Cholesky of
  ``XᵀX + (-λ_min + 1e-6) I``;
* ``whitening``: ``torch.linalg.inv`` of the Cholesky factor ``S`` (float64;
  on failure ``S + 1e-6 I`` first), both cast to float32, ``W S`` and its
  SVD in float32, ``W' = U_r Σ_r (V_rᵀ S⁻¹)`` split as
  ``(U_r √Σ_r)(√Σ_r V_rᵀ S⁻¹)``.

Only the numerics are transcribed; the model plumbing (hooks, layer
replacement) is not. ``dtype`` selects the precision of the second half
(SVD-LLM: float32; the parity test: float64). This is the reference the
package's ``damping="svd-llm"`` special case is tested against
(``tests/test_svdllm_parity.py``) and timed against (``validation/bench.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SvdLlmLayer(NamedTuple):
    """SVD-LLM's two factors (``svd_u``: m x r, ``svd_v``: r x n) and whether it fell back."""

    svd_u: torch.Tensor
    svd_v: torch.Tensor
    shifted: bool

    @property
    def weight(self) -> torch.Tensor:
        """``W' = svd_u @ svd_v``."""
        return self.svd_u @ self.svd_v


def svdllm_whitening_factor(gram: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``profle_svdllm``: Cholesky factor of the Gram matrix, eigenvalue shift on failure."""
    raw_scaling_diag_matrix = gram.double()
    shifted = False
    try:
        scaling_diag_matrix = torch.linalg.cholesky(raw_scaling_diag_matrix)
    except torch.linalg.LinAlgError:  # SVD-LLM: `except Exception`
        shifted = True
        eigenvalues = torch.linalg.eigvalsh(raw_scaling_diag_matrix)
        raw_scaling_diag_matrix = raw_scaling_diag_matrix + (
            -eigenvalues[0] + 1e-6
        ) * torch.eye(raw_scaling_diag_matrix.shape[0], dtype=torch.float64)
        scaling_diag_matrix = torch.linalg.cholesky(raw_scaling_diag_matrix)
    return scaling_diag_matrix, shifted


def svdllm_layer(
    weight: torch.Tensor, gram: torch.Tensor, rank: int, *, dtype: torch.dtype = torch.float32
) -> SvdLlmLayer:
    """``whitening`` for one layer at ``rank`` (SVD-LLM derives it from ``ratio``)."""
    scaling_diag_matrix, shifted = svdllm_whitening_factor(gram)
    w = weight.to(dtype)
    try:
        scaling_matrix_inv = torch.linalg.inv(scaling_diag_matrix)
    except torch.linalg.LinAlgError:  # SVD-LLM: `except Exception`
        scaling_diag_matrix = scaling_diag_matrix + 1e-6 * torch.eye(
            scaling_diag_matrix.shape[0], dtype=scaling_diag_matrix.dtype
        )
        scaling_matrix_inv = torch.linalg.inv(scaling_diag_matrix)
    scaling_diag_matrix = scaling_diag_matrix.to(dtype)
    scaling_matrix_inv = scaling_matrix_inv.to(dtype)
    w_scale = torch.matmul(w, scaling_diag_matrix)
    u, s, vt = torch.linalg.svd(w_scale, full_matrices=False)
    truc_s = s[:rank]
    truc_u = u[:, :rank]
    truc_v = torch.matmul(vt[:rank, :], scaling_matrix_inv)
    sqrt_sigma = torch.sqrt(torch.diag(truc_s))
    return SvdLlmLayer(torch.matmul(truc_u, sqrt_sigma), torch.matmul(sqrt_sigma, truc_v), shifted)


def svdllm_rank(m: int, n: int, ratio: float) -> int:
    """SVD-LLM's rank for a parameter ``ratio``: ``int(m n ratio / (m + n))``."""
    return int(m * n * ratio / (m + n))
