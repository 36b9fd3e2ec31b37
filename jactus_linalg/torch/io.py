"""Saving and loading compressed models: safetensors plus JSON, atomic, never unpickled.

A folder holds ``model.safetensors`` (the full state dict), ``jactus.json``
(format, architecture, per-layer core shapes, the model config) and nothing
else. Loading checks, before any tensor reaches the model, that the folder
has no pickle files, that the architecture matches, and that every tensor's
shape matches what the config and the model say.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
_TORCH_DTYPES = {code: getattr(torch, name) for name, code in _SAFETENSORS_DTYPES.items()}
#: A config rebuilt from a folder may describe a dense model at most this many
#: times larger than the tensors stored (retain >= 0.01).
_MAX_EXPANSION = 100


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

    Notes
    -----
    ``model.jactus_config`` (set by ``compress``) is saved in ``jactus.json``
    and :func:`load_compressed` attaches it to the loaded model.
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
    size = (folder / _CONFIG).stat().st_size
    if size > _MAX_CONFIG_BYTES:
        msg = (
            f"`folder` {folder}: {_CONFIG} holds {size} bytes, more than the "
            f"{_MAX_CONFIG_BYTES} a save_compressed config can need (tampered file?)"
        )
        raise ValueError(msg)
    try:
        config = json.loads((folder / _CONFIG).read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        why = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        msg = (
            f"`folder` {folder}: {_CONFIG} is not valid JSON ({why}); was it written by "
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
    if config.get("config") is not None and not isinstance(config["config"], dict):
        msg = f"`folder` {folder}: {_CONFIG} has a `config` that is not a JSON object (tampered file?)"
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


#: ``{tensor name: (shape, safetensors dtype code)}``, read from the file's header alone.
Header = dict[str, tuple[list[int], str]]


def _read_header(folder: Path, config: dict) -> Header:
    """Names, shapes and dtypes of ``model.safetensors``, checked against ``jactus.json``.

    safetensors itself checks, from the header, that every tensor's byte range
    lies inside the file; nothing is read or allocated here.
    """
    with _as_value_error(folder), safe_open(str(folder / _WEIGHTS), framework="pt") as f:
        header = {}
        for key in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
            view = f.get_slice(key)
            header[key] = (list(view.get_shape()), view.get_dtype())
    for key, (shape, dtype) in sorted(header.items()):
        if shape != config["shapes"].get(key):
            msg = (
                f"tensor `{key}` in {folder} has shape {shape}; the config records "
                f"{config['shapes'].get(key)} (tampered file?)"
            )
            raise ValueError(msg)
        recorded = config["dtypes"].get(key)
        if not isinstance(recorded, str) or _SAFETENSORS_DTYPES.get(recorded) != dtype:
            msg = f"tensor `{key}` in {folder} has dtype {dtype}; the config records {recorded!r} (tampered file?)"
            raise ValueError(msg)
    return header


@contextmanager
def _as_value_error(folder: Path) -> Iterator[None]:
    try:
        yield
    except SafetensorError as err:
        msg = (
            f"`folder` {folder}: {_WEIGHTS} is not a valid safetensors file ({err}): it is "
            "corrupted, truncated or tampered with"
        )
        raise ValueError(msg) from err


def _build_model(config: dict, header: Header, folder: Path) -> nn.Module:
    """A fresh Hugging Face model from the saved config, after checking it against the file.

    The config is untrusted: the class must be a ``transformers`` model class,
    the model it describes is first built on the meta device (nothing
    allocated), and every tensor it would hold after compression must match
    the file's header in name and shape. The dense model may be at most
    ``_MAX_EXPANSION`` times larger than the file's tensors; only then is it
    allocated, in the dtype of the stored factors.
    """
    import transformers  # noqa: PLC0415

    arch = config["architecture"]
    cls = getattr(transformers, arch, None) if arch.isidentifier() else None
    if cls is None or config.get("config") is None:
        msg = (
            f"cannot rebuild architecture {arch!r} from the folder alone: pass `model`, "
            "a freshly constructed instance of it"
        )
        raise ValueError(msg)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        msg = (
            f"`folder` {folder}: architecture {arch!r} is not a transformers model class "
            "(tampered file?); pass `model`, a freshly constructed instance of the model"
        )
        raise ValueError(msg)
    _bound_counts(config["config"], header, folder)
    try:
        hf_config = transformers.AutoConfig.for_model(**config["config"])
        config_class = cls.config_class
        if config_class is None or not isinstance(hf_config, config_class):
            msg = f"a {type(hf_config).__name__} is not the config of a {arch}"
            raise TypeError(msg)
        with torch.device("meta"):
            skeleton = cls(hf_config)
    except Exception as err:  # an untrusted config can fail in any way: say which file
        msg = (
            f"`folder` {folder}: the config in {_CONFIG} does not build a {arch} ({err!r}) "
            "(tampered file?); pass `model`"
        )
        raise ValueError(msg) from err
    _check_layers_exist(skeleton, config, folder)
    _check_tensors_match(header, _expected_state(skeleton, config), folder)
    stored = sum(math.prod(shape) for shape, _ in header.values())
    dense = sum(p.numel() for p in skeleton.parameters())
    if dense > _MAX_EXPANSION * max(stored, 1):
        msg = (
            f"`folder` {folder}: its config describes a dense model of {dense} parameters, "
            f"more than {_MAX_EXPANSION} times the {stored} numbers stored (tampered file?); "
            "to load it anyway, pass `model`, a freshly constructed instance"
        )
        raise ValueError(msg)
    first = next(iter(config["layers"]), None)
    dtype_code = header[f"{first}.left_proj.weight"][1] if first is not None else "F32"
    return cls(hf_config).to(_TORCH_DTYPES[dtype_code])


def _check_factor_dtypes(layers: dict, header: Header, folder: Path) -> None:
    """Every recorded layer's factors are stored, in a floating dtype."""
    floating = ("F64", "F32", "F16", "BF16")
    for name in layers:
        for part in ("right_proj.weight", "core.weight", "left_proj.weight"):
            key = f"{name}.{part}"
            if key not in header or header[key][1] not in floating:
                found = header[key][1] if key in header else "no tensor"
                msg = (
                    f"`folder` {folder}: factor `{key}` of layer `{name}` is {found}; a "
                    "floating tensor is needed (tampered file?)"
                )
                raise ValueError(msg)


def _bound_counts(hf: dict, header: Header, folder: Path) -> None:
    """Layer and expert counts in a config cannot exceed the number of stored tensors.

    Checked before the model is even built on the meta device, so that a
    claim of 10^9 layers cannot make Python build 10^9 modules.
    """
    for key, value in hf.items():
        counted = key.startswith("num_") and ("layers" in key or "experts" in key)
        if counted and isinstance(value, int) and value > len(header):
            msg = (
                f"`folder` {folder}: the config asks for {key}={value}, but {_WEIGHTS} holds "
                f"only {len(header)} tensors (tampered file?)"
            )
            raise ValueError(msg)


def _check_layers_exist(model: nn.Module, config: dict, folder: Path) -> None:
    modules = dict(model.named_modules())
    for name, spec in config["layers"].items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear | JactusLinear) or (
            mod.in_features, mod.out_features
        ) != (spec["in_features"], spec["out_features"]):
            shape = f"{spec['out_features']}x{spec['in_features']}"
            msg = f"`model` has no {shape} linear layer `{name}` recorded in {folder}"
            raise ValueError(msg)


def _check_tensors_match(header: Header, expected: dict[str, list[int]], folder: Path) -> None:
    if set(header) != set(expected):
        extra, lacking = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
        msg = (
            f"`folder` {folder}: tensors do not match the model: unexpected {extra[:3]}, "
            f"missing {lacking[:3]}"
        )
        raise ValueError(msg)
    for key in sorted(header):
        shape = header[key][0]
        if shape != expected[key]:
            msg = (
                f"tensor `{key}` in {folder} has shape {shape}; the model needs "
                f"{expected[key]} (tampered file, or another configuration of the model?)"
            )
            raise ValueError(msg)


def load_compressed(
    folder: str | os.PathLike, model: nn.Module | None = None
) -> nn.Module:
    """Load a folder written by :func:`save_compressed`.

    Parameters
    ----------
    folder : path
    model : nn.Module, optional
        A fresh (dense) instance of the same architecture. For Hugging Face
        models it can be omitted: it is rebuilt from the saved config, in the
        dtype the factors were saved in.

    Returns
    -------
    nn.Module
        The compressed model (``model`` itself, modified, when given).

    Raises
    ------
    ValueError
        If the folder holds pickle files, lacks its files, is for another
        architecture or layer layout, a tensor's shape or dtype does not
        match its record, a stored tensor holds NaN or Inf or does not fit
        the model's dtype, or (rebuilt from the config) the architecture is
        not a ``transformers`` model class or the config does not describe
        exactly the stored tensors; all checked before any tensor is copied
        in, and before a rebuilt model is allocated.

    Notes
    -----
    **Dtypes.** Stored tensors are cast to the dtypes of ``model`` (a
    float64 save loaded into a float32 model is rounded to float32 once).
    Each factored layer takes the dtype of the layer it replaces, except a
    core that was saved in another dtype than its factors (kept in float32
    by ``mark_trainable(core_dtype=...)``): it keeps its saved dtype, and
    :class:`JactusLinear` casts between the two in ``forward``.

    **Untrusted folders.** Only safetensors and JSON are read, never a
    pickle. Rebuilt from the config (``model`` omitted), the model is built
    on the meta device first and must hold exactly the stored tensors; its
    dense size may be at most 100 times the stored size.
    """
    folder = Path(folder)
    config = _read_config(folder)
    saved_config = _saved_jactus_config(config, folder)
    header = _read_header(folder, config)
    _check_factor_dtypes(config["layers"], header, folder)
    if model is None:
        model = _build_model(config, header, folder)
    if type(model).__name__ != config["architecture"]:
        msg = (
            f"`folder` holds a {config['architecture']} but `model` is a "
            f"{type(model).__name__}: pass a freshly constructed {config['architecture']}"
        )
        raise ValueError(msg)
    _check_layers_exist(model, config, folder)
    _check_tensors_match(header, _expected_state(model, config), folder)
    dtypes = _target_dtypes(model, config["layers"], header)
    with _as_value_error(folder), safe_open(str(folder / _WEIGHTS), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in sorted(header)}
    _check_values(state, dtypes, folder)
    _install_layers(model, config["layers"], dtypes)
    model.load_state_dict(state, strict=True)
    if saved_config is not None:
        model.jactus_config = saved_config  # type: ignore[assignment]  # a plain attribute
    return model


def _expected_state(model: nn.Module, config: dict) -> dict[str, list[int]]:
    """Shapes the state dict will have once the recorded layers are swapped in."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for name, spec in config["layers"].items():
        for key in [k for k in shapes if k.startswith(f"{name}.")]:
            shapes.pop(key)  # the dense layer's (or an earlier factored layer's) tensors
        a, b = spec["core"]
        shapes[f"{name}.right_proj.weight"] = [b, spec["in_features"]]
        shapes[f"{name}.core.weight"] = [a, b]
        shapes[f"{name}.left_proj.weight"] = [spec["out_features"], a]
        if spec["bias"]:
            shapes[f"{name}.left_proj.bias"] = [spec["out_features"]]
    return shapes


def _target_dtypes(model: nn.Module, layers: dict, header: Header) -> dict[str, torch.dtype]:
    """The dtype each stored tensor takes in ``model`` (see :func:`load_compressed`, Notes)."""
    out = {k: v.dtype for k, v in model.state_dict().items() if k in header}
    modules = dict(model.named_modules())
    for name in layers:
        mod = modules[name]
        ref = mod.weight.dtype if isinstance(mod, nn.Linear) else mod.left_proj.weight.dtype
        for key in header:
            if key.startswith(f"{name}.") and key.count(".") == name.count(".") + 2:
                out[key] = ref
        core, left = header[f"{name}.core.weight"][1], header[f"{name}.left_proj.weight"][1]
        if core != left:  # a core kept in its own precision (mark_trainable(core_dtype=...))
            out[f"{name}.core.weight"] = _TORCH_DTYPES[core]
    return out


def _check_values(
    state: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype], folder: Path
) -> None:
    """No NaN / Inf stored, and none made by casting to the model's dtype."""
    for key, t in state.items():
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            msg = (
                f"tensor `{key}` in {folder} holds non-finite values ({n_nan} NaN, {n_inf} "
                "Inf): the file is corrupted, or the model was saved after training diverged"
            )
            raise ValueError(msg)
        if dtypes[key].is_floating_point and not bool(torch.isfinite(t.to(dtypes[key])).all()):
            msg = (
                f"tensor `{key}` in {folder} ({t.dtype}) overflows the model's dtype "
                f"{dtypes[key]}: load it into a model of a wider dtype"
            )
            raise ValueError(msg)


def _install_layers(model: nn.Module, layers: dict, dtypes: dict[str, torch.dtype]) -> None:
    for name, spec in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        a, b = spec["core"]
        ref = old.weight if isinstance(old, nn.Linear) else old.core.weight
        new = JactusLinear(
            spec["in_features"], spec["out_features"], a, b, bias=spec["bias"],
            device=ref.device, dtype=dtypes[f"{name}.left_proj.weight"],
        )
        new.core.to(dtypes[f"{name}.core.weight"])
        setattr(parent, child, new)
