"""One layer through JACTUS: stream statistics, factorize, check the bounds.

Run: ``python docs/examples/quickstart.py``
"""

import numpy as np

from jactus_linalg import CrossMomentAccumulator, MomentAccumulator, jactus_layer

m, n, rank = 64, 96, 16
rng = np.random.default_rng(0)
weight = rng.standard_normal((m, n))
x = rng.standard_normal((512, n))  # calibration inputs of the layer
g = rng.standard_normal((512, m))  # loss gradients at its outputs

input_cov = MomentAccumulator(n, name="input_cov")  # C_x = E[x xᵀ], float64
grad_cov = MomentAccumulator(m, name="grad_cov")  # C_g = E[g gᵀ]
grad_mean = CrossMomentAccumulator(m, n)  # G = E[g xᵀ]
for xb, gb in zip(np.array_split(x, 4), np.array_split(g, 4), strict=True):
    input_cov.update(xb)
    grad_cov.update(gb)
    grad_mean.update(gb, xb)

layer = jactus_layer(
    weight,
    rank,
    input_cov=input_cov.result(),
    grad_cov=grad_cov.result(),
    grad_mean=grad_mean.result(),
    task_fraction=0.25,
)
approx = layer.left @ layer.core @ layer.right.T  # W ≈ A C Bᵀ
k, j = layer.weight_directions, layer.task_directions
print(f"rank {layer.rank}: k={k} weight + j={j} task directions")
print(
    f"factors {layer.left.shape} {layer.core.shape} {layer.right.shape}, {layer.n_params} numbers "
    f"(dense: {m * n})"
)
print(
    f"curvature-norm error {layer.error:.4f}, between {layer.eckart_young:.4f} "
    f"(optimal rank {rank}) and {layer.weight_bound:.4f} (rank {k})"
)
slack = 10 * n * np.finfo(np.float64).eps * layer.total_energy
assert layer.eckart_young**2 - slack <= layer.error**2 <= layer.weight_bound**2 + slack
