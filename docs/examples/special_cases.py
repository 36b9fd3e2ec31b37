"""The baselines as special cases of ``projected_lowrank``, each checked against a direct recipe.

==============================  ===========================================
inputs                          result
==============================  ===========================================
no covariances, no bases        truncated SVD of ``W`` (Eckart-Young)
``input_cov`` only              SVD-LLM-style data whitening
both covariances                two-sided (K-FAC) whitened SVD
both covariances + union bases  JACTUS (``jactus_layer``): the bases are
                                ``[Sg⁻ᵀ P_k, E_g]`` and ``[Sx⁻ᵀ Q_k, E_x]``,
                                ``E`` the covariances' top eigenvectors
same, gradient union bases      ``task_directions="gradient"`` (ablation):
                                top singular vectors of ``Γ``
==============================  ===========================================

Each direct recipe below is written out with numpy/scipy (Cholesky factor,
SVD, triangular solves), with the same relative damping as the package, and
the two reconstructions ``A C Bᵀ`` are compared. Spectra are chosen (known
condition numbers, a gap at the rank) so the comparison is well posed.

Run: ``python docs/examples/special_cases.py``
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from jactus_linalg import DEFAULT_DAMPING, jactus_layer, projected_lowrank, task_split
from jactus_linalg.testing import covariance_with_spectrum as covariance
from jactus_linalg.testing import with_spectrum

M_OUT, N_IN, RANK, TAU = 48, 64, 8, 0.25
EPS = float(np.finfo(np.float64).eps)


def damped_cholesky(c: np.ndarray) -> np.ndarray:
    delta = DEFAULT_DAMPING * np.mean(np.diag(c))
    return np.linalg.cholesky(c + delta * np.eye(len(c)))


def truncate(a: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def reconstruct(res) -> np.ndarray:
    return res.left @ res.core @ res.right.T


def compare(label: str, ours: np.ndarray, reference: np.ndarray, tol: float) -> None:
    rel = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    print(f"  {label:44s} ||ours - direct|| / ||direct|| = {rel:.1e}  (tol {tol:.1e})")
    assert rel <= tol, (label, rel, tol)


def main() -> None:
    rng = np.random.default_rng(5)
    sigma = np.concatenate([np.geomspace(10, 3, RANK), np.geomspace(1, 1e-2, M_OUT - RANK)])
    weight = with_spectrum(rng, M_OUT, N_IN, sigma)
    grad_mean = with_spectrum(rng, M_OUT, N_IN, np.geomspace(1, 1e-3, M_OUT))
    input_cov = covariance(rng, np.geomspace(1, 1e-2, N_IN))
    grad_cov = covariance(rng, np.geomspace(1, 1e-2, M_OUT))
    lx, lg = damped_cholesky(input_cov), damped_cholesky(grad_cov)
    kappa = np.linalg.cond(lx) * np.linalg.cond(lg)  # condition of the whitening map
    tol = 10 * N_IN * EPS * kappa
    print(f"W: {M_OUT}x{N_IN}, rank {RANK}, kappa(Sx) kappa(Sg) = {kappa:.1f}")

    # 1. no covariances, no bases: truncated SVD
    plain = projected_lowrank(weight, RANK)
    compare("no covariances -> truncated SVD", reconstruct(plain), truncate(weight, RANK), tol)

    # 2. input_cov only: SVD-LLM-style whitening, W ≈ trunc(W Sx) Sx⁻¹
    svd_llm = projected_lowrank(weight, RANK, input_cov=input_cov)
    direct = scipy.linalg.solve_triangular(lx, truncate(weight @ lx, RANK).T, lower=True, trans=1).T
    compare("input_cov only -> SVD-LLM whitening", reconstruct(svd_llm), direct, tol)

    # 3. both covariances: two-sided whitened SVD, W ≈ Sg⁻ᵀ trunc(Sgᵀ W Sx) Sx⁻¹
    both = projected_lowrank(weight, RANK, input_cov=input_cov, grad_cov=grad_cov)
    m_white = lg.T @ weight @ lx
    inner = scipy.linalg.solve_triangular(lx, truncate(m_white, RANK).T, lower=True, trans=1).T
    direct = scipy.linalg.solve_triangular(lg.T, inner, lower=False)
    compare("both covariances -> two-sided whitened SVD", reconstruct(both), direct, tol)

    # 4. both covariances + union bases: JACTUS. Task directions: the top-j
    #    eigenvectors E_g, E_x of the covariances, U = orth[P_k, Sgᵀ E_g],
    #    V = orth[Q_k, Sxᵀ E_x]; in layer coordinates the bases are
    #    [Sg⁻ᵀ P_k, E_g] and [Sx⁻ᵀ Q_k, E_x]
    k, j = task_split(RANK, TAU)
    p, _, qt = np.linalg.svd(m_white)
    e_g = np.linalg.eigh(grad_cov)[1][:, ::-1][:, :j]
    e_x = np.linalg.eigh(input_cov)[1][:, ::-1][:, :j]
    left = np.hstack([scipy.linalg.solve_triangular(lg.T, p[:, :k], lower=False), e_g])
    right = np.hstack([scipy.linalg.solve_triangular(lx.T, qt[:k].T, lower=False), e_x])
    union = projected_lowrank(
        weight, input_cov=input_cov, grad_cov=grad_cov, left=left, right=right
    )
    layer = jactus_layer(
        weight, RANK, input_cov=input_cov, grad_cov=grad_cov, task_fraction=TAU
    )
    compare(
        f"union bases (k={k}, j={j}) -> jactus_layer", reconstruct(layer), reconstruct(union), tol
    )

    # 5. the ablation task_directions="gradient": the top-j singular vectors
    #    of the whitened mean gradient Γ = Sg⁻¹ G Sx⁻ᵀ instead of E_g, E_x
    gamma = scipy.linalg.solve_triangular(lg, grad_mean, lower=True)  # Sg⁻¹ G
    gamma = scipy.linalg.solve_triangular(lx, gamma.T, lower=True).T  # ... Sx⁻ᵀ
    pg, _, qgt = np.linalg.svd(gamma)
    left = scipy.linalg.solve_triangular(lg.T, np.hstack([p[:, :k], pg[:, :j]]), lower=False)
    right = scipy.linalg.solve_triangular(lx.T, np.hstack([qt[:k].T, qgt[:j].T]), lower=False)
    gradient_union = projected_lowrank(
        weight, input_cov=input_cov, grad_cov=grad_cov, left=left, right=right
    )
    ablation = jactus_layer(
        weight, RANK, input_cov=input_cov, grad_cov=grad_cov, grad_mean=grad_mean,
        task_fraction=TAU, task_directions="gradient",
    )
    compare(
        "gradient union bases -> task_directions='gradient'",
        reconstruct(ablation), reconstruct(gradient_union), tol,
    )

    print("\ncurvature-norm errors (each in its own norm)")
    for label, res in (
        ("truncated SVD", plain),
        ("SVD-LLM whitening", svd_llm),
        ("two-sided whitened SVD", both),
        ("JACTUS union", union),
        ("JACTUS gradient ablation", gradient_union),
    ):
        print(f"  {label:24s} error {res.error:.6f}   Eckart-Young bound {res.eckart_young:.6f}")
    print(
        f"  JACTUS upper bound sqrt(sum_(i>k) sigma_i(M)^2) = {layer.weight_bound:.6f} "
        f"(k={layer.weight_directions} weight + j={layer.task_directions} task directions)"
    )
    assert layer.eckart_young <= layer.error * (1 + tol) and layer.error <= layer.weight_bound * (
        1 + tol
    )


if __name__ == "__main__":
    main()
