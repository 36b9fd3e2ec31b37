"""Numerical checks of the calculus on the theory pages that no unit test covers directly.

1. K-FAC: ``vec(ΔW)ᵀ (Cx ⊗ Cg) vec(ΔW) = ‖Sgᵀ ΔW Sx‖²_F`` (damped factors),
   and one token's weight gradient ``vec(g xᵀ) = x ⊗ g``.
2. ``Γ = Sg⁻¹ G Sx⁻ᵀ`` is the gradient of the loss with respect to the
   whitened weight ``M = Sgᵀ W Sx`` (central finite differences on a
   non-linear loss).
3. At ``W = A C Bᵀ`` the gradient with respect to the core is
   ``Aᵀ G B = Uᵀ Γ V``, and for the JACTUS union it keeps at least the top-j
   energy of ``Γ``: ``‖Uᵀ Γ V‖² ≥ Σ_{i≤j} σᵢ(Γ)²``.
4. In the whitened basis the damped K-FAC metric of the core is the
   identity: ``Bᵀ (Cx + δx I) B = I`` and ``Aᵀ (Cg + δg I) A = I``.

Run: ``python docs/examples/whitened_calculus.py``
"""

from __future__ import annotations

import numpy as np

from jactus_linalg import jactus_layer, whiten

M_OUT, N_IN, N_TOKENS, RANK, TAU = 12, 16, 400, 6, 0.5
EPS = float(np.finfo(np.float64).eps)


def softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def main() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N_TOKENS, N_IN)) * np.geomspace(1.0, 0.1, N_IN)
    weight = rng.standard_normal((M_OUT, N_IN)) / np.sqrt(N_IN)
    target = rng.standard_normal((N_TOKENS, M_OUT))

    def loss(w: np.ndarray) -> float:
        """Mean over tokens of sum_i softplus((W x)_i) - <target, W x>: smooth, non-quadratic."""
        y = x @ w.T
        return float(np.mean(np.sum(softplus(y) - target * y, axis=1)))

    def per_token_grads(w: np.ndarray) -> np.ndarray:
        """g_t = dL/dy_t for the *sum* over tokens (so G = mean_t g_t x_tᵀ = dL/dW)."""
        return sigmoid(x @ w.T) - target

    g = per_token_grads(weight)
    input_cov = x.T @ x / N_TOKENS
    grad_cov = g.T @ g / N_TOKENS
    grad_mean = g.T @ x / N_TOKENS
    sx, sg = whiten(input_cov, method="cholesky"), whiten(grad_cov, method="cholesky")
    print(f"layer {M_OUT}x{N_IN}, {N_TOKENS} tokens; relative damping {sx.relative_damping:g}")

    # 1. K-FAC quadratic form and the per-token gradient
    dw = rng.standard_normal((M_OUT, N_IN))
    vec = dw.flatten(order="F")  # column-major vec
    kron = np.kron(input_cov + sx.damping * np.eye(N_IN), grad_cov + sg.damping * np.eye(M_OUT))
    quad = vec @ kron @ vec
    white = np.linalg.norm(sg.factor.T @ dw @ sx.factor) ** 2
    rel = abs(quad - white) / white
    print(
        f"1. vec(dW)^T (Cx (x) Cg) vec(dW) = {quad:.10f}, "
        f"||Sg^T dW Sx||^2 = {white:.10f}, rel diff {rel:.1e}"
    )
    assert rel <= 10 * M_OUT * N_IN * EPS, rel
    token = np.outer(g[0], x[0]).flatten(order="F")
    assert np.array_equal(token, np.kron(x[0], g[0]))
    print("   vec(g x^T) == kron(x, g) for a token: True")

    # 2. Gamma is the gradient with respect to M (central differences);
    #    first, G = mean_t g_t x_tᵀ is dL/dW for this loss
    assert np.allclose(grad_mean, _numeric_grad(loss, weight), rtol=0, atol=1e-7)
    gamma = sg.inverse @ grad_mean @ sx.inverse.T
    m_white = sg.factor.T @ weight @ sx.factor

    def loss_of_m(m: np.ndarray) -> float:
        return loss(sg.inverse.T @ m @ sx.inverse)  # W = Sg^-T M Sx^-1

    numeric = _numeric_grad(loss_of_m, m_white)
    rel = np.linalg.norm(numeric - gamma) / np.linalg.norm(gamma)
    print(f"2. ||finite-difference dL/dM - Gamma|| / ||Gamma|| = {rel:.1e}")
    assert rel <= 1e-6, rel  # central differences, h = 1e-5: error O(h^2) + O(eps/h)

    # 3. gradient with respect to the core, and the task energy it keeps
    #    (with the Gamma union, task_directions="gradient": it contains the
    #    top-j singular directions of Gamma, hence the bound below)
    layer = jactus_layer(
        weight,
        RANK,
        input_cov=input_cov,
        grad_cov=grad_cov,
        grad_mean=grad_mean,
        task_fraction=TAU,
        task_directions="gradient",
        whitening="cholesky",
    )
    a, c, b = layer.left, layer.core, layer.right
    numeric = _numeric_grad(lambda cc: loss(a @ cc @ b.T), c)
    grad_at = per_token_grads(a @ c @ b.T).T @ x / N_TOKENS  # G at W = A C Bᵀ
    expected = a.T @ grad_at @ b
    rel = np.linalg.norm(numeric - expected) / np.linalg.norm(expected)
    print(f"3. ||finite-difference dL/dC - A^T G B|| / ||A^T G B|| = {rel:.1e}")
    assert rel <= 1e-6, rel
    u, v = sg.factor.T @ a, sx.factor.T @ b  # the orthonormal whitened bases
    kept = np.linalg.norm(u.T @ gamma @ v) ** 2
    top = np.sum(np.linalg.svd(gamma, compute_uv=False)[: layer.task_directions] ** 2)
    print(
        f"   ||U^T Gamma V||^2 = {kept:.6f} >= sum_(i<=j) sigma_i(Gamma)^2 = {top:.6f} "
        f"(k={layer.weight_directions}, j={layer.task_directions})"
    )
    assert kept >= top * (1 - 10 * N_IN * EPS)

    # 4. the damped K-FAC metric of the core is the identity in the whitened basis
    left_metric = a.T @ (grad_cov + sg.damping * np.eye(M_OUT)) @ a
    right_metric = b.T @ (input_cov + sx.damping * np.eye(N_IN)) @ b
    dev = max(
        np.linalg.norm(left_metric - np.eye(len(left_metric)), 2),
        np.linalg.norm(right_metric - np.eye(len(right_metric)), 2),
    )
    cond = np.linalg.cond(sx.factor) * np.linalg.cond(sg.factor)
    print(f"4. max(||A^T (Cg + dg I) A - I||, ||B^T (Cx + dx I) B - I||) = {dev:.1e}")
    assert dev <= 10 * N_IN * EPS * cond, dev


def _numeric_grad(f, point: np.ndarray, h: float = 1e-5) -> np.ndarray:
    grad = np.zeros_like(point)
    for idx in np.ndindex(point.shape):
        step = np.zeros_like(point)
        step[idx] = h
        grad[idx] = (f(point + step) - f(point - step)) / (2 * h)
    return grad


if __name__ == "__main__":
    main()
