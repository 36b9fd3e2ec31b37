"""jactus_linalg: the reference implementation of JACTUS (arXiv 2605.02829).

Joint Adaptation and Compression with a Task-aware Union of Subspaces:
whitening, union of subspaces, projected low-rank approximation in the
curvature norm, and global rank allocation, on numpy / array-api-strict /
torch arrays. The model adapter lives in :mod:`jactus_linalg.torch` (imported
on demand; ``import jactus_linalg`` never imports torch).
"""

from .allocation import (
    allocate_budget,
    allocate_ranks,
    allocate_uniform,
    bisect_budget,
    break_even_rank,
    factor_params,
    layer_units,
    rank_unit_costs,
)
from .covariance import (
    CovarianceRoot,
    CrossMomentAccumulator,
    LayerStatistics,
    MomentAccumulator,
)
from .jactus import (
    DEFAULT_TASK_DIRECTIONS,
    DEFAULT_TASK_FRACTION,
    JactusLayer,
    LayerPlan,
    jactus_layer,
    plan_layer,
    task_split,
)
from .lowrank import (
    Factors,
    LowRankResult,
    WhiteningInfo,
    curvature_error,
    orthonormal_factors,
    projected_lowrank,
)
from .subspaces import SubspaceUnion, principal_angles, union_of_subspaces
from .whitening import DEFAULT_DAMPING, Whitening, whiten

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DAMPING",
    "DEFAULT_TASK_DIRECTIONS",
    "DEFAULT_TASK_FRACTION",
    "CovarianceRoot",
    "CrossMomentAccumulator",
    "Factors",
    "JactusLayer",
    "LayerPlan",
    "LayerStatistics",
    "LowRankResult",
    "MomentAccumulator",
    "SubspaceUnion",
    "Whitening",
    "WhiteningInfo",
    "allocate_budget",
    "allocate_ranks",
    "allocate_uniform",
    "bisect_budget",
    "break_even_rank",
    "curvature_error",
    "factor_params",
    "jactus_layer",
    "layer_units",
    "orthonormal_factors",
    "plan_layer",
    "principal_angles",
    "projected_lowrank",
    "rank_unit_costs",
    "task_split",
    "union_of_subspaces",
    "whiten",
]
