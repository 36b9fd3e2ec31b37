"""Container for calibration statistics: per-layer access, merging, all-reduce, safetensors.

Layers that share an input (q, k, v; gate and up) share one input statistic,
stored once under the name of the first layer that reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._files import atomic_write
from ..covariance import GramProducts, LayerStatistics, MomentAccumulator

__all__ = ["CalibrationStats", "LayerInfo"]

_FORMAT = "jactus_linalg.calibration/1"


@dataclass(frozen=True)
class LayerInfo:
    """Shape and input group of one target layer."""

    name: str
    in_features: int
    out_features: int
    input_group: str


@dataclass
class CalibrationStats:
    """Streamed statistics of every target layer of one model.

    Attributes
    ----------
    layers : dict of str to LayerInfo
    inputs : dict of str to MomentAccumulator
        Input second moments, one per input group.
    grads : dict of str to MomentAccumulator
        Output-gradient second moments, one per layer.
    grad_sums : dict of str to Tensor
        :math:`\\sum_t g_t x_t^\\top` per layer (from the weight gradients).
    n_batches : int
        Batches absorbed (used to resume).
    meta : dict
        Model class, targets, accumulation dtype and mode.
    """

    layers: dict[str, LayerInfo] = field(default_factory=dict)
    inputs: dict[str, MomentAccumulator] = field(default_factory=dict)
    grads: dict[str, MomentAccumulator] = field(default_factory=dict)
    grad_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    n_batches: int = 0
    meta: dict = field(default_factory=dict)

    # -- access ---------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, name: str) -> LayerStatistics:
        """Mean statistics :math:`(C_x, C_g, G, N)` of layer ``name``."""
        if name not in self.layers:
            msg = f"no statistics for layer `{name}`; layers here: {', '.join(list(self.layers)[:6])}..."
            raise KeyError(msg)
        info = self.layers[name]
        inputs = self.inputs[info.input_group]
        count = inputs.count
        grads = self.grads.get(name)
        grad_cov = grads.result() if grads is not None and grads.count else None
        grad_mean = self.grad_sums[name] / count if name in self.grad_sums else None
        return LayerStatistics(
            inputs.result(), grad_cov, grad_mean, count, inputs.gram_products,
            grads.gram_products if grads is not None and grad_cov is not None else None,
        )

    def input_groups(self) -> dict[str, list[str]]:
        """``{group: [layer names]}`` for layers sharing one input statistic."""
        groups: dict[str, list[str]] = {}
        for info in self.layers.values():
            groups.setdefault(info.input_group, []).append(info.name)
        return groups

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Raise ``ValueError`` unless these statistics describe layers of these shapes.

        ``shapes`` maps each target layer name to ``(out_features, in_features)``.
        """
        missing = [n for n in shapes if n not in self.layers]
        if missing:
            msg = (
                f"`stats` has no statistics for {len(missing)} target layer(s), e.g. "
                f"{missing[:3]}: they come from another model or other targets; "
                "calibrate this model with the same `targets`"
            )
            raise ValueError(msg)
        for name, (out_f, in_f) in shapes.items():
            info = self.layers[name]
            if (info.out_features, info.in_features) != (out_f, in_f):
                msg = (
                    f"`stats` for layer `{name}` are for shape "
                    f"({info.out_features}, {info.in_features}) but the model's layer is "
                    f"({out_f}, {in_f}): statistics from another model; calibrate this model "
                    "and compress it with its own statistics"
                )
                raise ValueError(msg)

    # -- combining ------------------------------------------------------------

    def all_reduce(self) -> None:
        """Sum statistics over ``torch.distributed`` processes (no-op when not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        dist = torch.distributed
        for acc in [*self.inputs.values(), *self.grads.values()]:
            _all_reduce_moment(acc)
        for name in sorted(self.grad_sums):
            dist.all_reduce(self.grad_sums[name])
        batches = torch.tensor([self.n_batches], dtype=torch.int64)
        dist.all_reduce(batches)
        self.n_batches = int(batches.item())

    # -- persistence ----------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write to one safetensors file (atomic: temp file, then rename).

        Raises
        ------
        ValueError
            If ``path`` does not end in ``.safetensors`` (the only suffix
            :meth:`load` reads) or is an existing directory.
        """
        path = check_stats_path(path)
        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        products: dict[str, dict] = {}
        for side, accs in (("input", self.inputs), ("grad", self.grads)):
            for key, acc in accs.items():
                if acc.total is not None:
                    tensors[f"{side}/{key}"] = acc.total.contiguous()
                counts[f"{side}/{key}"] = acc.count
                if acc.gram_products is not None:
                    products[f"{side}/{key}"] = acc.gram_products._asdict()
        for key, total in self.grad_sums.items():
            tensors[f"grad_sum/{key}"] = total.contiguous()
        header = {
            "format": _FORMAT,
            "layers": [asdict(info) for info in self.layers.values()],
            "counts": counts,
            "modes": {"input": self._mode(self.inputs), "grad": self._mode(self.grads)},
            "products": products,
            "n_batches": self.n_batches,
            "meta": self.meta,
        }
        metadata = {"jactus": json.dumps(header)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @staticmethod
    def _mode(accs: dict[str, MomentAccumulator]) -> str:
        modes = {acc.mode for acc in accs.values()}
        return modes.pop() if len(modes) == 1 else "gram"

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read statistics written by :meth:`save` (safetensors only; never unpickles).

        How each Gram statistic was formed (``products``: dtype and most rows
        per product, :class:`~jactus_linalg.covariance.GramProducts`) comes
        back with it; a file without that record (written before it
        existed) was formed with products in its own dtype and loads as such.

        The file is treated as untrusted: its header is validated, and every
        tensor's shape and dtype is checked against the layer table before
        any tensor is read.

        Raises
        ------
        ValueError
            If ``path`` is not a ``.safetensors`` file, is not valid
            safetensors (a pickle, a truncated file, a header that claims
            more data than the file holds), lacks the jactus header, or its
            tensors' names, shapes, dtypes or values (NaN / Inf) do not match
            that header.
        """
        path = check_stats_path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist or is not a regular file"
            msg = f"`path` {path} {what}; pass a .safetensors file written by CalibrationStats.save"
            raise ValueError(msg)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("jactus")
                if raw is None:
                    msg = f"`path` {path} holds no jactus calibration header"
                    raise ValueError(msg)
                header = _parse_header(raw, path)
                expected = _expected_tensors(header)
                names = set(f.keys())
                unexpected = sorted(names - set(expected))
                if unexpected:
                    msg = f"`path` {path} holds tensors its header does not list: {unexpected[:3]}"
                    raise ValueError(msg)
                for key in sorted(names):
                    view = f.get_slice(key)
                    shape, dtype = list(view.get_shape()), view.get_dtype()
                    _check_tensor(path, key, shape, dtype, expected[key])
                tensors = {k: f.get_tensor(k) for k in sorted(names)}
        except SafetensorError as err:
            msg = (
                f"`path` {path} is not a valid safetensors file ({err}): it is corrupted, "
                "truncated or tampered with, or was not written by CalibrationStats.save"
            )
            raise ValueError(msg) from err
        for key, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                msg = f"tensor `{key}` in {path} holds NaN or Inf: the file is corrupted"
                raise ValueError(msg)
        counts = header["counts"]
        for key in expected:
            if key.startswith("grad_sum/"):
                continue
            has_tensor = key in tensors
            if has_tensor != (counts.get(key, 0) > 0):
                msg = (
                    f"`path` {path}: statistic `{key}` has count {counts.get(key, 0)} but "
                    f"{'a' if has_tensor else 'no'} tensor: the header does not match the data"
                )
                raise ValueError(msg)
        formed = header["products"]
        stats = cls(n_batches=header["n_batches"], meta=dict(header["meta"]))
        for d in header["layers"]:
            info = LayerInfo(**d)
            stats.layers[info.name] = info
        for info in stats.layers.values():
            group = info.input_group
            if group not in stats.inputs:
                stats.inputs[group] = _restore(
                    info.in_features, f"{group}:input_cov", header["modes"]["input"],
                    tensors.get(f"input/{group}"), counts.get(f"input/{group}", 0),
                    formed.get(f"input/{group}"),
                )
            stats.grads[info.name] = _restore(
                info.out_features, f"{info.name}:grad_cov", header["modes"]["grad"],
                tensors.get(f"grad/{info.name}"), counts.get(f"grad/{info.name}", 0),
                formed.get(f"grad/{info.name}"),
            )
            if f"grad_sum/{info.name}" in tensors:
                stats.grad_sums[info.name] = tensors[f"grad_sum/{info.name}"]
        return stats


_SAFETENSORS_FLOATS = {"F32": "float32", "F64": "float64"}
SUFFIX = ".safetensors"


def check_stats_path(path: str | os.PathLike, name: str = "path") -> Path:
    """``path`` as a Path, if it names a ``.safetensors`` file (the only format read or written).

    ``name`` is the argument named in the error (``checkpoint`` for :func:`calibrate`).
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        msg = (
            f"`{name}` must be a {SUFFIX} file (statistics are written and read only as "
            f"safetensors, never pickled); got {path}"
        )
        raise ValueError(msg)
    return path


def _malformed(path: Path, what: str) -> ValueError:
    return ValueError(
        f"`path` {path} has a malformed jactus calibration header ({what}); it was not "
        "written by CalibrationStats.save or was tampered with"
    )


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_header(raw: str, path: Path) -> dict:
    """The JSON header, with its structure and types checked."""
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as err:
        raise _malformed(path, f"not JSON: {err}") from err
    except RecursionError as err:
        raise _malformed(path, "JSON nested too deeply") from err
    if not isinstance(header, dict):
        raise _malformed(path, "not a JSON object")
    if header.get("format") != _FORMAT:
        msg = f"`path` {path} has format {header.get('format')!r}; expected {_FORMAT!r}"
        raise ValueError(msg)
    for key, kind in (("layers", list), ("counts", dict), ("modes", dict), ("meta", dict)):
        if not isinstance(header.get(key), kind):
            raise _malformed(path, f"`{key}` must be a {kind.__name__}")
    if not _is_count(header.get("n_batches")):
        raise _malformed(path, "`n_batches` must be a non-negative integer")
    for side in ("input", "grad"):
        if header["modes"].get(side) not in ("gram", "qr"):
            raise _malformed(path, f"`modes.{side}` must be 'gram' or 'qr'")
    if not all(isinstance(k, str) and _is_count(v) for k, v in header["counts"].items()):
        raise _malformed(path, "`counts` must map names to non-negative integers")
    fields = {"name", "in_features", "out_features", "input_group"}
    names = set()
    for d in header["layers"]:
        if not isinstance(d, dict) or set(d) != fields:
            raise _malformed(path, f"each layer needs exactly the fields {sorted(fields)}")
        if not (isinstance(d["name"], str) and isinstance(d["input_group"], str)):
            raise _malformed(path, "layer names must be strings")
        if not all(_is_count(d[k]) and d[k] > 0 for k in ("in_features", "out_features")):
            raise _malformed(path, f"layer `{d['name']}` needs positive integer sizes")
        names.add(d["name"])
    widths: dict[str, int] = {}
    for d in header["layers"]:
        if d["input_group"] not in names:
            raise _malformed(path, f"input group `{d['input_group']}` is not a layer")
        if widths.setdefault(d["input_group"], d["in_features"]) != d["in_features"]:
            raise _malformed(path, f"layers of input group `{d['input_group']}` differ in width")
    header["meta"] = _untrusted_meta(header["meta"], path)
    header["products"] = _parse_products(header, path)
    return header


def _parse_products(header: dict, path: Path) -> dict[str, GramProducts]:
    """``{statistic: GramProducts}`` from the header's ``products`` (absent in older files)."""
    raw = header.get("products", {})
    if not isinstance(raw, dict):
        raise _malformed(path, "`products` must be a dict")
    out: dict[str, GramProducts] = {}
    for key, rec in raw.items():
        ok = (
            isinstance(rec, dict) and set(rec) == {"dtype", "rows"}
            and rec["dtype"] in ("float32", "float64") and _is_count(rec["rows"]) and rec["rows"] > 0
        )
        if not ok:
            raise _malformed(
                path, f"`products.{key}` must be {{'dtype': 'float32' or 'float64', 'rows': > 0}}"
            )
        side = key.split("/", 1)[0]
        if header["counts"].get(key, 0) == 0 or header["modes"].get(side) != "gram":
            raise _malformed(path, f"`products.{key}` describes no Gram statistic with samples")
        out[key] = GramProducts(rec["dtype"], rec["rows"])
    return out


def _is_names(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


def _untrusted_meta(meta: dict, path: Path) -> dict:
    """``meta`` with no pattern left to execute: regexes from a file are never run.

    A file written by :func:`calibrate` records the layer names its
    ``targets`` selected (``target_names``); those replace the patterns. An
    older file that records only a pattern loses it (kept, for display, as
    ``targets_pattern``): :func:`compress` then trusts the statistics' own
    layer table.
    """
    meta = dict(meta)
    for key in ("targets", "exclude"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str) and not _is_names(value):
            raise _malformed(path, f"`meta.{key}` must be a string or a list of names")
    names = meta.get("target_names")
    if names is not None and not _is_names(names):
        raise _malformed(path, "`meta.target_names` must be a list of layer names")
    patterns = {
        key: value
        for key in ("targets", "exclude")
        if isinstance(value := meta.get(key), str) and value != "all-linear"
    }
    if names is not None:
        meta["targets"], meta["exclude"] = list(names), None
    elif patterns:
        for key in patterns:
            meta.pop(key)
    if patterns:
        meta["targets_pattern"] = patterns
    return meta


def _expected_tensors(header: dict) -> dict[str, tuple[str, int, int | None]]:
    """``{key: (mode, columns, rows)}``; ``rows=None``: at most ``columns`` rows (a QR root)."""
    modes = header["modes"]
    out: dict[str, tuple[str, int, int | None]] = {}

    def square(mode: str, dim: int) -> tuple[str, int, int | None]:
        return (mode, dim, dim if mode == "gram" else None)

    for d in header["layers"]:
        out[f"input/{d['input_group']}"] = square(modes["input"], d["in_features"])
        out[f"grad/{d['name']}"] = square(modes["grad"], d["out_features"])
        out[f"grad_sum/{d['name']}"] = ("gram", d["in_features"], d["out_features"])
    return out


def _check_tensor(
    path: Path, key: str, shape: list[int], dtype: str, spec: tuple[str, int, int | None]
) -> None:
    """Shape and dtype of one stored tensor, read from the header only."""
    _, cols, rows = spec
    if dtype not in _SAFETENSORS_FLOATS:
        msg = f"tensor `{key}` in {path} has dtype {dtype}; statistics are float32 or float64"
        raise ValueError(msg)
    ok = len(shape) == 2 and shape[1] == cols and (
        shape[0] == rows if rows is not None else 1 <= shape[0] <= cols
    )
    if not ok:
        want = f"[{rows}, {cols}]" if rows is not None else f"[p, {cols}] with 1 <= p <= {cols}"
        msg = (
            f"tensor `{key}` in {path} has shape {shape}; its layer table needs {want} "
            "(tampered file?)"
        )
        raise ValueError(msg)


def _restore(
    dim: int, name: str, mode: str, total, count: int, formed: GramProducts | None = None
) -> MomentAccumulator:
    """An accumulator holding a stored sum; a Gram sum without a record had products in its dtype.

    Its ``products`` policy is the one the record shows: ``"compute"`` where
    products ran below the stored sum's dtype, so a resumed calibration
    forms its remaining products as the interrupted one did.
    """
    acc = MomentAccumulator(dim, name=name, mode=mode)
    if total is not None:
        acc.dtype_name = str(total.dtype).replace("torch.", "")
        if mode == "gram" and count > 0:
            acc.formed = formed or GramProducts(acc.dtype_name, int(count))
            if acc.formed.dtype != acc.dtype_name:
                acc.products = "compute"
    acc.total = total
    acc.count = int(count)
    return acc


def _all_reduce_moment(acc: MomentAccumulator) -> None:
    dist = torch.distributed
    count = torch.tensor([acc.count], dtype=torch.int64)
    dist.all_reduce(count)
    if acc.total is None:
        msg = f"statistic `{acc.name}` is empty on rank {dist.get_rank()}"
        raise RuntimeError(msg)
    if acc.mode == "gram":
        dist.all_reduce(acc.total)
        # the coarsest products and the longest product of any rank
        formed = acc.formed or GramProducts("float64", 1)
        worst = torch.tensor([formed.rows, int(formed.dtype == "float32")], dtype=torch.int64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        acc.formed = GramProducts("float32" if int(worst[1]) else "float64", int(worst[0]))
    else:
        parts = [torch.empty_like(acc.total) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, acc.total.contiguous())
        merged = MomentAccumulator(acc.dim, name=acc.name, mode="qr", dtype=acc.dtype_name)
        for p in parts:
            merged.update(p)
        acc.total = merged.total
    acc.count = int(count.item())
