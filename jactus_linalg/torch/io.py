"""Saving and loading compressed models: safetensors plus JSON, atomic, never unpickled.

A folder holds ``model.safetensors`` (the full state dict), ``jactus.json``
(format, architecture, per-layer core shapes, the model config) and nothing
else. Loading checks, before any tensor reaches the model, that the folder
has no pickle files, that the architecture matches, and that every tensor's
shape matches what the config and the model say.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .._files import replace_folder
from .config import JactusConfig
from .layer import JactusLinear
from .merge import has_unmerged_cores, merged_state_dict

__all__ = ["load_compressed", "save_compressed"]

_FORMAT = "jactus_linalg.model/1"
_WEIGHTS = "model.safetensors"
_CONFIG = "jactus.json"
#: What ``save_compressed`` writes; ``jactus.json`` lists them under ``files``.
_OWN_FILES = (_WEIGHTS, _CONFIG)
#: A larger ``jactus.json`` is refused unread (a real one is a few hundred KB).
_MAX_CONFIG_BYTES = 64 * 2**20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: safetensors' dtype codes, by the torch dtype names ``jactus.json`` records.
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def _layer_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "core": list(m.rank),
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, JactusLinear)
    }


def _hf_config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None and hasattr(config, "to_dict") else None


def _jactus_config(model: nn.Module) -> dict | None:
    """The :class:`JactusConfig` that ``compress`` attached to ``model``, as JSON values."""
    config = getattr(model, "jactus_config", None)
    return config.to_dict() if isinstance(config, JactusConfig) else None


def _saved_jactus_config(config: dict, folder: Path) -> JactusConfig | None:
    """The ``jactus_config`` record of ``jactus.json``, validated (``None`` if absent)."""
    record = config.get("jactus_config")
    if record is None:
        return None
    try:
        return JactusConfig.from_dict(record)
    except (TypeError, ValueError) as err:
        msg = f"`folder` {folder}: {_CONFIG} holds an invalid `jactus_config` ({err}) (tampered file?)"
        raise ValueError(msg) from err


def _refuse_unmerged(model: nn.Module, merge: bool) -> list[str]:
    """Names of the mergeable cores, refused unless ``merge``."""
    unmerged = has_unmerged_cores(model)
    if unmerged and not merge:
        msg = (
            f"`model` has {len(unmerged)} unmerged mergeable core(s) (e.g. `{unmerged[0]}`): "
            "call `merge(model)` first (it folds them into their weights), or pass "
            "`merge=True` to save the merged weights and leave `model` as it is"
        )
        raise ValueError(msg)
    return unmerged


def save_compressed(
    model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False, merge: bool = False
) -> Path:
    """Write ``model`` (compressed) to ``folder`` atomically.

    ``folder`` must be new, empty, or hold only what an earlier
    ``save_compressed`` wrote there (the files its ``jactus.json`` lists).
    Anything else in it is never deleted unless ``overwrite=True``.

    The new contents are written to a temporary sibling folder, then swapped
    in with renames. Whatever interrupts the save (an error, ``Ctrl-C``), at
    whatever step, ``folder`` holds either the previous model, intact, or
    the new one, and no temporary folder is left behind.

    Parameters
    ----------
    model : nn.Module
        A compressed model (holding :class:`JactusLinear` layers).
    folder : path
    overwrite : bool, optional
        Replace ``folder`` even if it holds files that ``save_compressed``
        did not write: **the whole folder is replaced and those files are
        deleted**. Never allowed for the current working directory or a
        folder that contains it. Default ``False``.
    merge : bool, optional
        Save a model that still has mergeable cores (layers kept dense by
        :func:`~jactus_linalg.torch.compress`) with each core folded into its
        weight, as :func:`~jactus_linalg.torch.merge` would; ``model`` itself
        is left as it is. Default ``False``: such a model is refused.

    ``model.jactus_config`` (set by ``compress``) is saved in ``jactus.json``
    and :func:`load_compressed` attaches it to the loaded model.

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    ValueError
        If ``model`` has unmerged mergeable cores (without ``merge=True``),
        holds no :class:`JactusLinear` (and was not made by ``compress``),
        is a peft model, or
        ``folder`` is an existing file, a symbolic link, or a folder holding
        other files (without ``overwrite=True``), or the working directory
        or one of its parents.
    """
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        msg = (
            "`model` is a peft model: merge the adapters first (`model = "
            "model.merge_and_unload()`), then save the compressed model"
        )
        raise ValueError(msg)
    unmerged = _refuse_unmerged(model, merge)
    layers = _layer_table(model)
    if not layers and _jactus_config(model) is None:
        msg = "`model` holds no JactusLinear layer; save a compressed model"
        raise ValueError(msg)
    folder = Path(folder)
    _check_replaceable(folder, overwrite=overwrite)

    def fill(tmp: Path) -> None:
        raw = merged_state_dict(model) if unmerged else model.state_dict()
        state = {k: v.detach().contiguous() for k, v in raw.items()}
        state = _untie(state)
        save_file(state, str(tmp / _WEIGHTS), metadata={"format": _FORMAT})
        config = {
            "format": _FORMAT,
            "architecture": type(model).__name__,
            "layers": layers,
            "shapes": {k: list(v.shape) for k, v in state.items()},
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in state.items()},
            "config": _hf_config(model),
            "jactus_config": _jactus_config(model),
            "files": sorted(_OWN_FILES),
        }
        (tmp / _CONFIG).write_text(json.dumps(config, indent=1))

    return replace_folder(folder, fill)


def _check_replaceable(folder: Path, *, overwrite: bool) -> None:
    """Refuse to replace anything but a new or empty folder, or one we wrote before."""
    if folder.is_symlink():
        msg = (
            f"`folder` {folder} is a symbolic link: refusing to replace it; pass the "
            "path it points to, or a new path"
        )
        raise ValueError(msg)
    if not folder.exists():
        return
    if not folder.is_dir():
        msg = (
            f"`folder` {folder} is an existing file, not a folder: refusing to replace it; "
            "pass the path of a new or empty folder"
        )
        raise ValueError(msg)
    _refuse_working_directory(folder)
    if overwrite:
        return
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    own = _files_written_by_us(folder)
    others = [e for e in entries if e not in own]
    if others:
        what = "was not written by save_compressed" if not own else "holds other files"
        msg = (
            f"`folder` {folder} {what} ({len(others)} other entries, e.g. {others[:5]}): "
            "refusing to delete them. Save to a new or empty folder, or pass "
            "overwrite=True to replace the whole folder (its other files are deleted)"
        )
        raise ValueError(msg)


def _refuse_working_directory(folder: Path) -> None:
    resolved, cwd = folder.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        msg = (
            f"`folder` {folder} is the working directory or one of its parents: refusing to "
            "replace it (even with overwrite=True); save to a new subfolder"
        )
        raise ValueError(msg)


def _files_written_by_us(folder: Path) -> set[str]:
    """Names that an earlier ``save_compressed`` wrote in ``folder`` (empty if none)."""
    config_path = folder / _CONFIG
    if not config_path.is_file() or config_path.stat().st_size > _MAX_CONFIG_BYTES:
        return set()
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return set()
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        return set()
    files = config.get("files", sorted(_OWN_FILES))
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..") for f in files
    ):
        return set()
    return {*files, _CONFIG}


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: clone tensors that alias another."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        msg = f"`folder` {folder} is not a directory"
        raise ValueError(msg)
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        msg = (
            f"`folder` {folder} contains pickle files {pickles}: refusing to load; "
            "only model.safetensors and jactus.json are read"
        )
        raise ValueError(msg)
    for required in (_WEIGHTS, _CONFIG):
        if not (folder / required).is_file():
            msg = f"`folder` {folder} lacks {required}; was it written by save_compressed?"
            raise ValueError(msg)
    try:
        config = json.loads((folder / _CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = (
            f"`folder` {folder}: {_CONFIG} is not valid JSON ({err}); was it written by "
            "save_compressed?"
        )
        raise ValueError(msg) from err
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        msg = f"`folder` {folder} has format {found!r}; expected {_FORMAT!r}"
        raise ValueError(msg)
    for key, kind in (("architecture", str), ("layers", dict), ("shapes", dict), ("dtypes", dict)):
        if not isinstance(config.get(key), kind):
            msg = f"`folder` {folder}: {_CONFIG} lacks a valid `{key}` (tampered file?)"
            raise ValueError(msg)
    for name, spec in config["layers"].items():
        if not _valid_layer_spec(spec):
            msg = (
                f"`folder` {folder}: malformed record for layer `{name}` in {_CONFIG} "
                "(tampered file?)"
            )
            raise ValueError(msg)
    return config


def _valid_layer_spec(spec: object) -> bool:
    def positive(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    return (
        isinstance(spec, dict)
        and positive(spec.get("in_features"))
        and positive(spec.get("out_features"))
        and isinstance(spec.get("core"), list)
        and len(spec["core"]) == 2
        and all(positive(x) for x in spec["core"])
        and isinstance(spec.get("bias"), bool)
    )


def _build_model(config: dict) -> nn.Module:
    import transformers  # noqa: PLC0415

    arch = config["architecture"]
    cls = getattr(transformers, arch, None)
    if cls is None or config.get("config") is None:
        msg = (
            f"cannot rebuild architecture {arch!r} from the folder alone: pass `model`, "
            "a freshly constructed instance of it"
        )
        raise ValueError(msg)
    hf_config = transformers.AutoConfig.for_model(**config["config"])
    return cls(hf_config)


def load_compressed(
    folder: str | os.PathLike, model: nn.Module | None = None
) -> nn.Module:
    """Load a folder written by :func:`save_compressed`.

    Parameters
    ----------
    folder : path
    model : nn.Module, optional
        A fresh (dense) instance of the same architecture. For Hugging Face
        models it can be omitted: it is rebuilt from the saved config.

    Returns
    -------
    nn.Module
        The compressed model (``model`` itself, modified, when given).

    Raises
    ------
    ValueError
        If the folder holds pickle files, lacks its files, is for another
        architecture or layer layout, or a tensor's shape or dtype does not
        match its record; all checked before any tensor is copied in.
    """
    folder = Path(folder)
    config = _read_config(folder)
    saved_config = _saved_jactus_config(config, folder)
    if model is None:
        model = _build_model(config)
    if type(model).__name__ != config["architecture"]:
        msg = (
            f"`folder` holds a {config['architecture']} but `model` is a "
            f"{type(model).__name__}: pass a freshly constructed {config['architecture']}"
        )
        raise ValueError(msg)
    modules = dict(model.named_modules())
    for name, spec in config["layers"].items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear | JactusLinear) or (
            mod.in_features, mod.out_features
        ) != (spec["in_features"], spec["out_features"]):
            shape = f"{spec['out_features']}x{spec['in_features']}"
            msg = f"`model` has no {shape} linear layer `{name}` recorded in {folder}"
            raise ValueError(msg)
    expected = _expected_state(model, config)
    try:
        state = _read_checked(folder, config, expected)
    except SafetensorError as err:
        msg = (
            f"`folder` {folder}: {_WEIGHTS} is not a valid safetensors file ({err}): it is "
            "corrupted, truncated or tampered with"
        )
        raise ValueError(msg) from err
    _install_layers(model, config["layers"], state)
    model.load_state_dict(state, strict=True)
    if saved_config is not None:
        model.jactus_config = saved_config
    return model


def _read_checked(
    folder: Path, config: dict, expected: dict[str, list[int]]
) -> dict[str, torch.Tensor]:
    """Every tensor, after checking names, shapes and dtypes from the file's header alone."""
    with safe_open(str(folder / _WEIGHTS), framework="pt") as f:
        names = set(f.keys())
        if names != set(expected):
            extra, lacking = sorted(names - set(expected)), sorted(set(expected) - names)
            msg = f"`folder` tensors do not match the model: unexpected {extra[:3]}, missing {lacking[:3]}"
            raise ValueError(msg)
        for key in sorted(names):
            view = f.get_slice(key)
            shape = list(view.get_shape())
            if shape != expected[key] or shape != config["shapes"].get(key):
                msg = (
                    f"tensor `{key}` in {folder} has shape {shape}; the config records "
                    f"{config['shapes'].get(key)} and the model needs {expected[key]} (tampered file?)"
                )
                raise ValueError(msg)
            recorded = config["dtypes"].get(key)
            if _SAFETENSORS_DTYPES.get(recorded) != view.get_dtype():
                msg = (
                    f"tensor `{key}` in {folder} has dtype {view.get_dtype()}; the config "
                    f"records {recorded!r} (tampered file?)"
                )
                raise ValueError(msg)
        return {k: f.get_tensor(k) for k in sorted(names)}


def _expected_state(model: nn.Module, config: dict) -> dict[str, list[int]]:
    """Shapes the state dict will have once the recorded layers are swapped in."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for name, spec in config["layers"].items():
        for suffix in ("weight", "bias"):
            shapes.pop(f"{name}.{suffix}", None)
        a, b = spec["core"]
        shapes[f"{name}.right_proj.weight"] = [b, spec["in_features"]]
        shapes[f"{name}.core.weight"] = [a, b]
        shapes[f"{name}.left_proj.weight"] = [spec["out_features"], a]
        if spec["bias"]:
            shapes[f"{name}.left_proj.bias"] = [spec["out_features"]]
    return shapes


def _install_layers(model: nn.Module, layers: dict, state: dict[str, torch.Tensor]) -> None:
    for name, spec in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        a, b = spec["core"]
        dtype = state[f"{name}.core.weight"].dtype
        ref = old.weight if isinstance(old, nn.Linear) else old.core.weight
        new = JactusLinear(
            spec["in_features"], spec["out_features"], a, b, bias=spec["bias"],
            device=ref.device, dtype=dtype,
        )
        setattr(parent, child, new)
