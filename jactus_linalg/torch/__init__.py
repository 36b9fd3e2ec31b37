"""Torch adapter: apply the JACTUS core to models (hooks, layer, compress, save and load).

It holds no numerics of its own: statistics go through
:mod:`jactus_linalg.covariance`, factorizations through
:func:`jactus_linalg.plan_layer`, and allocation through
:func:`jactus_linalg.allocate_ranks`.
"""

from .baselines import CompressThenLoRA, compress_then_lora, lora_adapter_params, lora_model
from .calibrate import calibrate
from .compress import (
    METHODS,
    CompressionPlan,
    CompressionReport,
    LayerReport,
    allocate,
    compress,
    plan_compression,
    replace_layers,
)
from .io import load_compressed, save_compressed
from .layer import JactusLinear
from .stats import CalibrationStats, LayerInfo
from .targets import find_targets
from .tuning import core_parameters, count_parameters, mark_trainable

__all__ = [
    "METHODS",
    "CalibrationStats",
    "CompressThenLoRA",
    "CompressionPlan",
    "CompressionReport",
    "JactusLinear",
    "LayerInfo",
    "LayerReport",
    "allocate",
    "calibrate",
    "compress",
    "compress_then_lora",
    "core_parameters",
    "count_parameters",
    "find_targets",
    "load_compressed",
    "lora_adapter_params",
    "lora_model",
    "mark_trainable",
    "plan_compression",
    "replace_layers",
    "save_compressed",
]
