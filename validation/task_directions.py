r"""Task directions: split-half stability and held-out gradient energy (issue 11).

Which task directions should JACTUS add to the weight subspace? This script
measures, on one small offline setting, the two numbers behind the choice of
``task_directions="covariance"`` over ``"gradient"``:

1. **Split-half stability.** The calibration batches are split in two halves
   (batches 0-3 and 4-7). For each half and each layer, the top-:math:`j`
   directions are computed from: the whitened mean gradient :math:`\Gamma`
   (``"gradient"``), the whitened weight :math:`M` (weight subspace), the
   covariances :math:`C_g`, :math:`C_x` (``"covariance"``), and random
   directions. The overlap of the two halves' subspaces is
   :math:`\lVert Q_1^\top Q_2\rVert_F^2 / j` (mean squared cosine of the
   principal angles: 1 = same subspace, :math:`\approx j/d` for random ones),
   with every subspace taken in the layer's own coordinates as deployed
   (:math:`S^{-\top} P` for the weight and gradient directions).

2. **Held-out gradient energy.** Each factorization is built from the first
   half only. On the held-out half, the share of each batch's weight-gradient
   energy that a core in the union can reach is
   :math:`\sum_b \lVert Q_A^\top G_b Q_B\rVert_F^2 / \sum_b \lVert G_b\rVert_F^2`,
   with :math:`Q_A, Q_B` orthonormal bases of :math:`\operatorname{span}(A)`,
   :math:`\operatorname{span}(B)` (the core is trained in those bases). It is
   compared for the weight subspace alone (:math:`\tau = 0`), the
   :math:`\Gamma` union, a random union and the covariance union.

Setting (offline, seconds on 2 cores): an MLP 64-128-128-10 trained on
sklearn digits (first 1000 images), adapted to the same digits mirrored
left-right (a domain shift); calibration: 8 batches of 64 mirrored images
from the rest. Run::

    python -m validation.task_directions [--rank 16] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import jactus_linalg as jl
from jactus_linalg.torch import calibrate
from jactus_linalg.whitening import (
    inverse_transpose_times,
    whitened_gradient,
    whitened_weight,
    whitening_operator,
)

TAUS = (0.25, 0.5)
LAYERS = ("0", "2", "4")


def digits_setting(seed: int = 0):
    """(pretrained MLP, 8 calibration batches of mirrored digits, loss)."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10),
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_x, train_y = x[:1000], y[:1000]
    for _ in range(60):
        for i in range(0, 1000, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train_x[i : i + 100]), train_y[i : i + 100]).backward()
            opt.step()
    model.eval()
    mirrored = x.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)
    order = torch.randperm(797, generator=torch.Generator().manual_seed(seed)) + 1000
    batches = [(mirrored[order[i * 64 : (i + 1) * 64]], y[order[i * 64 : (i + 1) * 64]]) for i in range(8)]

    def loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return model, batches, loss


def orth(a: np.ndarray) -> np.ndarray:
    return np.linalg.qr(a)[0]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    r""":math:`\lVert Q_a^\top Q_b\rVert_F^2 / j`: mean squared cosine of the principal angles."""
    qa, qb = orth(a), orth(b)
    return float(np.sum((qa.T @ qb) ** 2) / qa.shape[1])


def half_statistics(model, batches, loss):
    stats = calibrate(model, batches, loss, targets=list(LAYERS), progress=False)
    return {name: stats.layer(name) for name in LAYERS}


def directions(weight: np.ndarray, layer, j: int, rng) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Top-j (left, right) directions of each kind, in the layer's own coordinates."""
    cx, cg, gm = (t.numpy() for t in (layer.input_cov, layer.grad_cov, layer.grad_mean))
    ox = whitening_operator(cx, method="eigh", name="input_cov")
    og = whitening_operator(cg, method="eigh", name="grad_cov")
    m_white = whitened_weight(weight, og, ox)
    gamma = whitened_gradient(gm, og, ox)
    p, _, qh = np.linalg.svd(m_white)
    pt, _, qth = np.linalg.svd(gamma)
    e_g = np.linalg.eigh(cg)[1]
    e_x = np.linalg.eigh(cx)[1]
    m, n = weight.shape
    return {
        "gradient (Gamma)": (
            inverse_transpose_times(og, pt[:, :j]), inverse_transpose_times(ox, qth[:j].T)
        ),
        "weight (M)": (inverse_transpose_times(og, p[:, :j]), inverse_transpose_times(ox, qh[:j].T)),
        "covariance (Cg, Cx)": (e_g[:, ::-1][:, :j], e_x[:, ::-1][:, :j]),
        "random": (rng.standard_normal((m, j)), rng.standard_normal((n, j))),
    }


def per_batch_gradients(model, batches, loss) -> dict[str, list[np.ndarray]]:
    modules = dict(model.named_modules())
    out: dict[str, list[np.ndarray]] = {name: [] for name in LAYERS}
    for b in batches:
        model.zero_grad()
        loss(model, b).backward()
        for name in LAYERS:
            out[name].append(modules[name].weight.grad.detach().numpy().copy())
    model.zero_grad(set_to_none=True)
    return out


def captured(qa: np.ndarray, qb: np.ndarray, grads: list[np.ndarray]) -> float:
    reach = sum(float(np.sum((qa.T @ g @ qb) ** 2)) for g in grads)
    return reach / sum(float(np.sum(g**2)) for g in grads)


def union_bases(weight, layer, rank, tau, source, rng) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases of span(A), span(B) of the rank-``rank`` factorization."""
    cx, cg, gm = (t.numpy() for t in (layer.input_cov, layer.grad_cov, layer.grad_mean))
    if source == "random":
        base = jl.jactus_layer(weight, rank - round(tau * rank), input_cov=cx, grad_cov=cg, task_fraction=0.0)
        j = round(tau * rank)
        m, n = weight.shape
        left = np.concatenate([base.left, rng.standard_normal((m, j))], axis=1)
        right = np.concatenate([base.right, rng.standard_normal((n, j))], axis=1)
        return orth(left), orth(right)
    lay = jl.jactus_layer(
        weight, rank, input_cov=cx, grad_cov=cg, grad_mean=gm, task_fraction=tau,
        task_directions=source if tau > 0 else "covariance",
    )
    return orth(lay.left), orth(lay.right)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16, help="layer rank r (j = round(tau r))")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    model, batches, loss = digits_setting(args.seed)
    first, second = batches[:4], batches[4:]
    halves = [half_statistics(model, h, loss) for h in (first, second)]
    weights = {name: dict(model.named_modules())[name].weight.detach().numpy() for name in LAYERS}

    j = max(1, round(TAUS[0] * args.rank))
    print(f"Split-half stability of the top-{j} subspace (overlap, mean cos^2; min-max over layers, both sides)")
    per_kind: dict[str, list[float]] = {}
    for name in LAYERS:
        one = directions(weights[name], halves[0][name], j, rng)
        two = directions(weights[name], halves[1][name], j, rng)
        for kind in one:
            for side in (0, 1):
                per_kind.setdefault(kind, []).append(overlap(one[kind][side], two[kind][side]))
    for kind, values in per_kind.items():
        print(f"  {kind:<22} {min(values):.2f}-{max(values):.2f}")

    held_out = per_batch_gradients(model, second, loss)
    print(f"\nHeld-out gradient energy a rank-{args.rank} core can reach (factors from batches 0-3,")
    print("gradients of batches 4-7; mean over layers, min-max in brackets)")
    rows = [("weight subspace (tau=0)", 0.0, "covariance")]
    for tau in TAUS:
        rows += [
            (f"Gamma union tau={tau}", tau, "gradient"),
            (f"random union tau={tau}", tau, "random"),
            (f"covariance union tau={tau}", tau, "covariance"),
        ]
    for label, tau, source in rows:
        shares = []
        for name in LAYERS:
            w = weights[name]
            r = min(args.rank, jl.break_even_rank(*w.shape))
            qa, qb = union_bases(w, halves[0][name], r, tau, source, rng)
            shares.append(captured(qa, qb, held_out[name]))
        print(f"  {label:<28} {100 * np.mean(shares):5.1f}%  [{100 * min(shares):.1f}-{100 * max(shares):.1f}]")
    dense, _ = _mean_loss(model, batches, loss)
    print(f"\n(model: loss {dense:.3f} nats on the 8 calibration batches of mirrored digits; "
          f"layers {', '.join(f'{n}: {weights[n].shape[0]}x{weights[n].shape[1]}' for n in LAYERS)})")


def _mean_loss(model, batches, loss) -> tuple[float, int]:
    with torch.no_grad():
        values = [float(loss(model, b)) for b in batches]
    return float(np.mean(values)), len(values)


if __name__ == "__main__":
    main()
