"""Torch adapter: apply the JACTUS core to models (hooks, layer, compress, save and load).

What a user calls::

    stats = calibrate(model, batches, loss_fn)
    report = compress(model, stats, JactusConfig(retain=0.8))  # trains only the cores
    ...  # tune: torch.optim.AdamW(core_parameters(model))
    merge(model)  # fold the mergeable cores of dense layers into their weights
    save_compressed(model, "folder")
    model = load_compressed("folder")

One decomposition, several budgets::

    prepared = prepare_compression(model, stats, JactusConfig())
    report = prepared.compress(copy.deepcopy(model), retain=0.7)  # per retain: cheap
    # or: compress_many(model, stats, [0.6, 0.7, 0.8, 0.9]) -> [(model, report), ...]

It holds no numerics of its own: statistics go through
:mod:`jactus_linalg.covariance`, factorizations through
:func:`jactus_linalg.plan_layer`, and allocation through the core's budget
solver. Helpers (``plan_compression``, ``allocate``, ``replace_layers``,
``find_targets``, the report types) stay in their modules.
"""

from .baselines import compress_then_lora, lora_model
from .calibrate import calibrate
from .compress import PreparedCompression, compress, compress_many, prepare_compression
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
    "PreparedCompression",
    "calibrate",
    "compress",
    "compress_many",
    "compress_then_lora",
    "core_parameters",
    "count_parameters",
    "load_compressed",
    "lora_model",
    "mark_trainable",
    "merge",
    "prepare_compression",
    "save_compressed",
]
