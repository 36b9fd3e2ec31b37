"""Failure mode 2: fewer calibration tokens than features makes the Gram matrix singular.

With ``N < n`` the input second moment ``C = XᵀX / N`` (n x n) has rank at
most ``N``. Its Cholesky factor does not exist and its inverse is not
defined; a Gram-plus-inverse route either raises or returns numbers that
are not an inverse.

:func:`jactus_linalg.whiten` handles the case explicitly: relative damping
``δ = damping · mean(diag C)`` makes ``C + δI`` positive definite, the
numerical rank and the absolute ``δ`` are reported, and the factor is
checked here against its definition ``S Sᵀ = C + δI``. The streamed-QR
root (``MomentAccumulator(mode="qr")``, an N x n trapezoid here) gives the
same whitened norm without forming ``C``.

Run: ``python docs/examples/coala_fewer_tokens_than_features.py``
"""

from __future__ import annotations

import numpy as np

from jactus_linalg import MomentAccumulator, projected_lowrank, whiten

N_TOKENS, N_FEATURES, N_OUT, RANK = 48, 128, 96, 16
EPS = float(np.finfo(np.float64).eps)


def main() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N_TOKENS, N_FEATURES))
    gram_acc = MomentAccumulator(N_FEATURES, name="input_cov")
    root_acc = MomentAccumulator(N_FEATURES, name="input_cov", mode="qr")
    gram_acc.update(x)
    root_acc.update(x)
    cov = gram_acc.result()
    print(f"N={N_TOKENS} tokens < n={N_FEATURES} features: rank(C) <= {N_TOKENS}")

    print("\nGram + inverse route")
    try:
        np.linalg.cholesky(cov)
        print("  np.linalg.cholesky(C): succeeded")
    except np.linalg.LinAlgError as err:
        print(f"  np.linalg.cholesky(C): LinAlgError: {err}")
    try:
        inv = np.linalg.inv(cov)
        resid = np.linalg.norm(inv @ cov - np.eye(N_FEATURES), 2)
        print(f"  np.linalg.inv(C): returned; ||inv(C) C - I||_2 = {resid:.2e} (0 for an inverse)")
    except np.linalg.LinAlgError as err:
        print(f"  np.linalg.inv(C): LinAlgError: {err}")

    print("\njactus_linalg.whiten(C) (default relative damping)")
    white = whiten(cov)
    n = N_FEATURES
    damped = cov + white.damping * np.eye(n)
    recon = np.linalg.norm(white.factor @ white.factor.T - damped, 2) / np.linalg.norm(damped, 2)
    cond = np.linalg.cond(white.factor)
    inv_err = np.linalg.norm(white.inverse @ white.factor - np.eye(n), 2)
    bound = np.sqrt(1 + n / white.relative_damping)
    print(
        f"  method={white.method}, numerical_rank={white.numerical_rank}, "
        f"relative damping={white.relative_damping:g}, absolute delta={white.damping:.3e}"
    )
    print(f"  effective_rank = sum lambda/(lambda+delta) = {white.effective_rank:.2f}")
    for note in white.notes:
        print(f"  note: {note}")
    print(f"  ||S S^T - (C + delta I)||_2 / ||C + delta I||_2 = {recon:.2e}")
    print(f"  kappa(S) = {cond:.3e} <= sqrt(1 + n/damping) = {bound:.3e}")
    print(f"  ||S^-1 S - I||_2 = {inv_err:.2e}")
    assert recon <= 10 * n * EPS, recon
    assert cond <= bound * (1 + 10 * n * EPS), (cond, bound)
    assert inv_err <= 10 * n * EPS * cond, inv_err

    print("\nfrom the streamed-QR root (never forms C)")
    root = root_acc.result()
    white_root = whiten(root, method="cholesky")
    probe = rng.standard_normal((n, 5))
    norm_gram = np.linalg.norm(white.factor.T @ probe)
    norm_root = np.linalg.norm(white_root.factor.T @ probe)
    rel = abs(norm_root - norm_gram) / norm_gram
    print(
        f"  root shape {tuple(root.root.shape)}, same delta: "
        f"{np.isclose(white_root.damping, white.damping, rtol=10 * n * EPS, atol=0)}"
    )
    print(
        f"  whitened norm ||S^T Y||_F: Gram {norm_gram:.6f}, root {norm_root:.6f}, "
        f"relative difference {rel:.1e}"
    )
    assert rel <= 10 * n * EPS * cond, rel

    print("\nprojected_lowrank(W, 16, input_cov=C): SVD-LLM-style compression")
    weight = rng.standard_normal((N_OUT, n))
    res = projected_lowrank(weight, RANK, input_cov=cov)
    finite = all(np.isfinite(a).all() for a in (res.left, res.core, res.right))
    print(
        f"  factors finite: {finite}; curvature-norm error {res.error:.4f} "
        f">= Eckart-Young bound {res.eckart_young:.4f}"
    )
    info = res.input_whitening
    print(
        f"  input whitening: method={info.method}, delta={info.damping:.3e}, "
        f"notes: {list(info.notes) or 'none (Cholesky of C + delta I succeeded)'}"
    )
    assert finite
    assert res.error >= res.eckart_young * (1 - 10 * n * EPS)


if __name__ == "__main__":
    main()
