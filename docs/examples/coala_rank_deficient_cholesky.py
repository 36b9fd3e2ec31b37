"""Failure mode 3: Cholesky of a rank-deficient Gram matrix fails.

Enough tokens (N > n), but some features carry nothing new: dead units
(always zero) and duplicated features (one unit copying another). ``C`` is
then singular in exact arithmetic and, after rounding, slightly indefinite,
so a plain Cholesky fails. What :func:`jactus_linalg.whiten` does instead:

* ``damping=0``: a ``ValueError`` that names the statistic, its numerical
  rank and what to do (no silent retry loop);
* ``method="eigh"``: eigenvalues in ``[-10 n eps λ_max, 0)`` are rounding,
  clipped to 0 and reported; the relative damping makes the factor
  invertible;
* ``method="cholesky"`` with relative damping: the Cholesky of ``C + δI``
  succeeds; with a damping too small to lift the rounding negatives it
  fails *once*, falls back to eigh and says so.

Every factor returned is checked against ``S Sᵀ = C + δI``.

Run: ``python docs/examples/coala_rank_deficient_cholesky.py``
"""

from __future__ import annotations

import numpy as np

from jactus_linalg import MomentAccumulator, whiten

N_TOKENS, N_LIVE, N_DEAD, N_COPIES = 4096, 80, 8, 8
EPS = float(np.finfo(np.float64).eps)


def calibration_inputs(rng: np.random.Generator) -> np.ndarray:
    live = rng.standard_normal((N_TOKENS, N_LIVE)) * np.geomspace(1.0, 1e-2, N_LIVE)
    dead = np.zeros((N_TOKENS, N_DEAD))
    copies = live[:, :N_COPIES]  # duplicated features
    return np.concatenate([live, dead, copies], axis=1)


def check(white, cov: np.ndarray, label: str) -> None:
    n = cov.shape[0]
    damped = cov + white.damping * np.eye(n)
    recon = np.linalg.norm(white.factor @ white.factor.T - damped, 2) / np.linalg.norm(damped, 2)
    print(
        f"  {label}: method used={white.method}, delta={white.damping:.2e}, "
        f"||S S^T - (C + delta I)|| / ||C + delta I|| = {recon:.1e}"
    )
    for note in white.notes:
        print(f"    note: {note}")
    assert recon <= 10 * n * EPS, (label, recon)
    cond = np.linalg.cond(white.factor)
    inv_err = np.linalg.norm(white.inverse @ white.factor - np.eye(n), 2)
    assert inv_err <= 10 * n * EPS * cond, (label, inv_err, cond)


def main() -> None:
    rng = np.random.default_rng(2)
    x = calibration_inputs(rng)
    acc = MomentAccumulator(x.shape[1], name="input_cov")
    acc.update(x)
    cov = acc.result()
    n = cov.shape[0]
    lam = np.linalg.eigvalsh(cov)
    print(
        f"n={n} features: {N_LIVE} live, {N_DEAD} dead, {N_COPIES} duplicated; N={N_TOKENS} tokens"
    )
    print(f"eigenvalues of C: min {lam[0]:.2e}, max {lam[-1]:.2e}")

    print("\nGram + Cholesky route")
    try:
        np.linalg.cholesky(cov)
        print("  np.linalg.cholesky(C): succeeded")
    except np.linalg.LinAlgError as err:
        print(f"  np.linalg.cholesky(C): LinAlgError: {err}")

    print("\njactus_linalg.whiten")
    try:
        whiten(cov, damping=0.0)
        raise AssertionError("damping=0 on a singular covariance must raise")
    except ValueError as err:
        print(f"  damping=0 -> ValueError: {err}")
    check(whiten(cov, method="eigh"), cov, "eigh, damping=1e-3")
    check(whiten(cov, method="cholesky"), cov, "cholesky, damping=1e-3")
    check(whiten(cov, method="cholesky", damping=1e-16), cov, "cholesky, damping=1e-16")


if __name__ == "__main__":
    main()
