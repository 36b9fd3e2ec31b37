"""Tutorial: the core on your own matrices, with numpy.

Streams the statistics of one layer, whitens them, runs the four special
cases of ``projected_lowrank``, builds the JACTUS union by hand and checks it
against ``jactus_layer``, checks the Pythagoras and Eckart-Young identities,
looks at what the task directions do for the core's gradient, and allocates
ranks over three layers under one budget. Every claim printed is asserted,
with tolerances c * n * eps(float64) (times a norm ratio where the error
theory has one).

Shown on ``docs/tutorials/core.md``; the torch version is
``docs/examples/tutorial_core_torch.py``.

Run: ``python docs/examples/tutorial_core_numpy.py``
"""

from __future__ import annotations

# --8<-- [start:data]
import numpy as np

from jactus_linalg import (
    CrossMomentAccumulator,
    MomentAccumulator,
    allocate_ranks,
    allocate_uniform,
    curvature_error,
    factor_params,
    jactus_layer,
    layer_units,
    plan_layer,
    projected_lowrank,
    task_split,
    union_of_subspaces,
    whiten,
)


def make_layer(rng: np.random.Generator, m: int, n: int, n_tokens: int, decay: float):
    """A weight with a decaying spectrum, correlated inputs, and gradients that depend on them."""
    weight = (
        rng.standard_normal((m, n))
        * np.geomspace(1.0, decay, n)
        @ np.linalg.qr(rng.standard_normal((n, n)))[0]
    )
    mixing = rng.standard_normal((n, n)) * np.geomspace(1, 0.05, n)  # correlated features
    x = rng.standard_normal((n_tokens, n)) @ mixing
    task = rng.standard_normal((m, 3)) @ rng.standard_normal((3, n)) / n  # a rank-3 task signal
    g = x @ task.T + 0.3 * rng.standard_normal((n_tokens, m))  # plays dL/dy at the outputs
    return weight, x, g


rng = np.random.default_rng(0)
m, n, n_tokens, rank = 48, 64, 2048, 8
weight, x, g = make_layer(rng, m, n, n_tokens, decay=1e-2)
# --8<-- [end:data]

EPS = float(np.finfo(np.float64).eps)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Relative Frobenius difference ``||a - b|| / ||b||``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


print(f"layer {m}x{n}, {n_tokens} calibration tokens, rank {rank}")

# --8<-- [start:stats]
input_acc = MomentAccumulator(n, name="input_cov")  # C_x = E[x xᵀ], float64 Gram sums
root_acc = MomentAccumulator(n, name="input_cov", mode="qr")  # R with RᵀR = Σ x xᵀ
grad_acc = MomentAccumulator(m, name="grad_cov")  # C_g = E[g gᵀ]
mean_acc = CrossMomentAccumulator(m, n)  # G = E[g xᵀ]
halves = [MomentAccumulator(n), MomentAccumulator(n)]  # two "processes"
for i, rows in enumerate(np.array_split(np.arange(n_tokens), 4)):  # 4 batches
    input_acc.update(x[rows])
    root_acc.update(x[rows])
    grad_acc.update(g[rows])
    mean_acc.update(g[rows], x[rows])
    halves[i // 2].update(x[rows])
input_cov, grad_cov, grad_mean = input_acc.result(), grad_acc.result(), mean_acc.result()
root = root_acc.result()  # a CovarianceRoot: root.root is upper triangular
merged = halves[0].merge(halves[1]).result()
# --8<-- [end:stats]
one_shot = x.T @ x / n_tokens
tol = 10 * n * EPS
gram_err = rel(input_cov, one_shot)
root_err = rel(root.root.T @ root.root, one_shot)
merge_err = rel(merged, one_shot)
print("\n[statistics]")
print(f"  streamed Gram vs one-shot X^T X / N : {gram_err:.1e}")
print(f"  streamed QR root R^T R vs one-shot  : {root_err:.1e}")
print(f"  merged halves vs one-shot           : {merge_err:.1e}   (tol 10 n eps = {tol:.1e})")
print(f"  root: {type(root).__name__}, shape {root.root.shape}, n_samples {root.n_samples}")
assert max(gram_err, root_err, merge_err) <= tol

# --8<-- [start:whiten]
sx = whiten(input_cov)  # method="eigh": symmetric square root, relative damping 1e-3
sx_chol = whiten(input_cov, method="cholesky")  # lower-triangular factor, same norm
sx_root = whiten(root, method="cholesky")  # from R, never forming RᵀR
damped = input_cov + sx.damping * np.eye(n)
probe = weight.T  # any n x k matrix: ||Sᵀ probe|| does not depend on the factor
# --8<-- [end:whiten]
kappa = float(np.linalg.cond(damped))
fac_err = rel(sx.factor @ sx.factor.T, damped)
inv_err = float(np.linalg.norm(sx.inverse @ sx.factor - np.eye(n)) / np.sqrt(n))
norms = [float(np.linalg.norm(s.factor.T @ probe)) for s in (sx, sx_chol, sx_root)]
spread = (max(norms) - min(norms)) / norms[0]
print("\n[whiten]")
print(
    f"  method {sx.method}, damping {sx.damping:.3e} = {sx.relative_damping:g} x mean diag, "
    f"effective rank {sx.effective_rank:.1f} of {n}"
)
print(f"  ||S S^T - (C + delta I)|| / ||C + delta I|| = {fac_err:.1e}   (tol {tol:.1e})")
print(f"  ||S^-1 S - I|| / sqrt(n) = {inv_err:.1e}   (tol {tol * np.sqrt(kappa):.1e})")
print("  ||S^T W^T||: eigh {:.10f}, cholesky {:.10f}, from QR root {:.10f}".format(*norms))
assert fac_err <= tol
assert inv_err <= tol * np.sqrt(kappa)  # kappa(S) = sqrt(kappa(C + delta I))
assert spread <= tol * np.sqrt(kappa)

# --8<-- [start:special]
covs = {"input_cov": input_cov, "grad_cov": grad_cov}
svd = projected_lowrank(weight, rank)  # no covariances: truncated SVD
svd_llm = projected_lowrank(weight, rank, input_cov=input_cov)  # SVD-LLM whitening
kfac = projected_lowrank(weight, rank, **covs)  # two-sided whitened SVD

# JACTUS by hand: whitened weight and gradient, union of their top subspaces
sx, sg = whiten(input_cov, method="cholesky"), whiten(grad_cov, method="cholesky")
whitened = sg.factor.T @ weight @ sx.factor  # M = S_gᵀ W S_x
gamma = sg.inverse @ grad_mean @ sx.inverse.T  # Γ = S_g⁻¹ G S_x⁻ᵀ
p, sigma, qt = np.linalg.svd(whitened)
pg, sigma_g, qgt = np.linalg.svd(gamma)
k, j = task_split(rank, 0.25)  # k weight + j task directions
u = union_of_subspaces(p[:, :k], pg[:, :j]).basis  # orth[P_k, P'_j]
v = union_of_subspaces(qt[:k].T, qgt[:j].T).basis  # orth[Q_k, Q'_j]
by_hand = projected_lowrank(
    weight,
    **covs,
    left=sg.inverse.T @ u,
    right=sx.inverse.T @ v,  # bases in layer coords
)
layer = jactus_layer(
    weight, rank, **covs, grad_mean=grad_mean, task_fraction=0.25, task_directions="gradient"
)
# --8<-- [end:special]
print("\n[projected_lowrank: the four special cases]")
u_svd, s_w, vt_svd = np.linalg.svd(weight)
direct = (u_svd[:, :rank] * s_w[:rank]) @ vt_svd[:rank]
svd_diff = rel(svd.left @ svd.core @ svd.right.T, direct)
print(f"  truncated SVD vs np.linalg.svd: ||A C B^T - W_r|| / ||W_r|| = {svd_diff:.1e}")
assert svd_diff <= tol
for label, res in (
    ("no covariances -> truncated SVD", svd),
    ("input_cov only -> SVD-LLM", svd_llm),
    ("both -> two-sided whitened SVD", kfac),
    ("both + union bases -> JACTUS", by_hand),
):
    print(
        f"  {label:<34} error {res.error:10.6f}   Eckart-Young {res.eckart_young:10.6f}"
        f"   {res.n_params} numbers"
    )
for res in (svd, svd_llm, kfac):  # optimal subspaces: the bound is attained
    assert abs(res.error - res.eckart_young) <= tol * res.total_energy / res.error
hand = by_hand.left @ by_hand.core @ by_hand.right.T
diff = rel(hand, layer.left @ layer.core @ layer.right.T)
kappa_s = float(np.linalg.cond(sx.factor) * np.linalg.cond(sg.factor))
print(
    f"  JACTUS by hand vs jactus_layer: ||diff|| / ||W_hat|| = {diff:.1e}"
    f"   (tol 10 n eps kappa(Sx) kappa(Sg) = {tol * kappa_s:.1e})"
)
assert diff <= tol * kappa_s

# --8<-- [start:identities]
direct_error = curvature_error(weight, layer.left, layer.core, layer.right, **covs)
pythagoras = np.sqrt(np.sum(whitened**2) - np.sum(layer.core**2))  # ||M||² - ||C||²
tail = np.sqrt(np.cumsum(sigma[::-1] ** 2)[::-1])  # tail[r] = sqrt(Σ_{i>r} σᵢ(M)²)
random_bases = projected_lowrank(
    weight, **covs, left=rng.standard_normal((m, rank)), right=rng.standard_normal((n, rank))
)
# --8<-- [end:identities]
tol_err = tol * layer.total_energy / layer.error  # absolute accuracy of err via ||M||²-||C||²
print("\n[identities]")
print(f"  Pythagoras: ||M - U C V^T|| = {direct_error:.12f} (residual, curvature_error)")
print(f"              sqrt(||M||^2 - ||C||^2) = {pythagoras:.12f}")
print(f"              layer.error             = {layer.error:.12f}")
print(
    f"  Eckart-Young: {tail[rank]:.6f} (sum_(i>r)) <= JACTUS {layer.error:.6f}"
    f" <= {tail[k]:.6f} (sum_(i>k))"
)
print(f"                random rank-{rank} subspaces: error {random_bases.error:.6f}")
assert abs(direct_error - pythagoras) <= tol_err
assert abs(layer.error - pythagoras) <= tol_err
assert abs(layer.eckart_young - tail[rank]) <= tol_err
assert abs(layer.weight_bound - tail[k]) <= tol_err
assert tail[rank] - tol_err <= layer.error <= tail[k] + tol_err
assert random_bases.error >= tail[rank]

# --8<-- [start:gradient]
no_task = jactus_layer(weight, rank, **covs, grad_mean=grad_mean, task_fraction=0.0)


def core_gradient_energy(lay) -> float:
    """||∂L/∂C||² = ||Aᵀ G B||² at W = A C Bᵀ (= ||Uᵀ Γ V||², see Training only the core)."""
    return float(np.sum((lay.left.T @ grad_mean @ lay.right) ** 2))


# --8<-- [end:gradient]
top_j = float(np.sum(sigma_g[:j] ** 2))
total_g = float(np.sum(sigma_g**2))
e_task, e_none = core_gradient_energy(layer), core_gradient_energy(no_task)
print(f"\n[task directions: tau = 0.25 (k={k}, j={j}) vs tau = 0]")
print(f"  ||Gamma||^2 = {total_g:.6f}, top-{j} energy sum_(i<=j) sigma_i(Gamma)^2 = {top_j:.6f}")
print(f"  core gradient ||A^T G B||^2: tau=0.25 {e_task:.6f}, tau=0 {e_none:.6f}")
print(f"  curvature-norm error:     tau=0.25 {layer.error:.6f}, tau=0 {no_task.error:.6f}")
assert e_task >= top_j * (1 - tol * kappa_s)
assert e_task > e_none
assert no_task.error <= layer.error + tol_err  # tau = 0 is the optimal rank-r error

# --8<-- [start:allocate]
shapes = [(48, 64), (64, 64), (96, 64)]
plans = []
for (mi, ni), decay in zip(shapes, (1e-2, 1e-1, 1e-3), strict=True):
    w_i, x_i, g_i = make_layer(rng, mi, ni, n_tokens, decay)
    plans.append(
        plan_layer(  # one decomposition per layer, every rank up to break-even
            w_i,
            input_cov=x_i.T @ x_i / n_tokens,
            grad_cov=g_i.T @ g_i / n_tokens,
            grad_mean=g_i.T @ x_i / n_tokens,
        )
    )
units = [layer_units(p.gains, *p.shape, p.total_energy) for p in plans]
budget = 0.3  # of the dense parameters of these layers
taken = allocate_ranks([u[0] for u in units], [u[1] for u in units], budget)
uniform = allocate_uniform(shapes, budget)


def outcome(p, r: int) -> tuple[int, float]:
    """(parameters, predicted loss increase ½ err²) of layer plan ``p`` at rank ``r``."""
    mi, ni = p.shape
    if r > p.max_rank:  # every unit taken: the layer stays dense
        return mi * ni, 0.0
    return factor_params(mi, ni, r), 0.5 * (p.total_energy - p.energy[r])


# --8<-- [end:allocate]
print(f"\n[allocate_ranks: 3 layers, budget {budget} of their dense parameters]")
header = ("shape", "break-even", "global", "uniform", "dL global", "dL uniform")
print("  {:>7} {:>10} {:>7} {:>8} {:>11} {:>11}".format(*header))
sums = np.zeros(4)
for p, t, r_u in zip(plans, taken, uniform, strict=True):
    pg_, lg = outcome(p, t)
    pu, lu = outcome(p, r_u)
    sums += (pg_, pu, lg, lu)
    shape = f"{p.shape[0]}x{p.shape[1]}"
    rank_g = "dense" if t > p.max_rank else str(t)
    print(f"  {shape:>7} {p.max_rank:>10} {rank_g:>7} {r_u:>8} {lg:11.4e} {lu:11.4e}")
dense_total = sum(mi * ni for mi, ni in shapes)
print(
    f"  parameters: global {int(sums[0])}, uniform {int(sums[1])}, "
    f"budget {budget * dense_total:.0f} (dense {dense_total})"
)
print(f"  predicted loss increase: global {sums[2]:.4e}, uniform {sums[3]:.4e}")
assert min(taken) >= 1
assert sums[0] <= budget * dense_total and sums[1] <= budget * dense_total
assert sums[2] <= sums[3]
