"""Torch adapter: apply the JACTUS core to models (hooks, layer, compress, save and load).

What a user calls::

    stats = calibrate(model, batches, loss_fn)
    report = compress(model, stats, JactusConfig(retain=0.8))  # trains only the cores
    ...  # tune: torch.optim.AdamW(core_parameters(model))
    merge(model)  # fold the mergeable cores of dense layers into their weights
    save_compressed(model, "folder")
    model = load_compressed("folder")

It holds no numerics of its own: statistics go through
:mod:`jactus_linalg.covariance`, factorizations through
:func:`jactus_linalg.plan_layer`, and allocation through the core's budget
solver. Helpers (``plan_compression``, ``allocate``, ``replace_layers``,
``find_targets``, the report types) stay in their modules.
"""

from .baselines import compress_then_lora, lora_model
from .calibrate import calibrate
from .compress import compress
from .config import JactusConfig
from .io import load_compressed, save_compressed
from .layer import JactusLinear
from .merge import merge
from .stats import CalibrationStats
from .tuning import core_parameters, count_parameters, mark_trainable

__all__ = [
    "CalibrationStats",
    "JactusConfig",
    "JactusLinear",
    "calibrate",
    "compress",
    "compress_then_lora",
    "core_parameters",
    "count_parameters",
    "load_compressed",
    "lora_model",
    "mark_trainable",
    "merge",
    "save_compressed",
]
