"""Small ViT assets: Fashion-MNIST pretraining, sklearn digits as the downstream task.

There are no pretrained ViT weights offline, so :func:`pretrained_vit`
pretrains a small ``ViTForImageClassification`` on Fashion-MNIST (read from
the Debian package ``dataset-fashion-mnist``, idx files under
``/usr/share/datasets/fashion-mnist``) once per seed and caches it as
safetensors under ``$JACTUS_CACHE`` (written to a temp folder, then renamed).

Recipe (``RECIPE_VERSION = "v1"``)
----------------------------------
* Model (:func:`vit_config`): image 28x28, 1 channel, patch 7 (16 patches +
  CLS), hidden 64, 4 layers, 4 heads, MLP 256, no dropout, 10 labels;
  about 0.2 M parameters.
* Data: the 60,000 Fashion-MNIST training images, pixels scaled to [0, 1]
  then ``(x - 0.5) / 0.5``; no augmentation.
* Optimizer: AdamW, lr 2e-3, weight decay 0.05, betas (0.9, 0.999),
  batch 128, 5 epochs, linear warmup over the first 5% of steps then cosine
  decay to 0; gradient-norm clip 1.0; float32; seeded init and shuffling;
  one torch thread (:func:`one_thread`): the bytes of the weights depend on
  how many threads split the sums, so a pretraining on all the cores of a
  16-core machine would not give the fingerprint of a 2-core one.
* Measured (seed 0, 2 CPU cores shared with other jobs, load average ~3.5):
  pretraining took 476 s wall (an uncontended partial-epoch timing
  extrapolates to ~100 s); train loss per epoch 0.90, 0.48, 0.40, 0.33,
  0.30; Fashion-MNIST test accuracy 0.873 (10,000 test images). The numbers
  of each build are saved in ``pretrain_metrics.json`` next to the weights
  (:func:`pretrained_vit_metrics`).

The downstream task (:func:`digits_task`) is sklearn's 8x8 digits (1,797
images, 10 classes, pixel values 0-16), upsampled bilinearly to 28x28,
scaled to [0, 1] and normalized like Fashion-MNIST. Adaptation replaces the
classifier head (:func:`replace_head`).

Smoke path (no apt package): :func:`tiny_vit` (random tiny config) and
:func:`tiny_pretrained_vit`, which pretrains it briefly on the digits
images rotated by 90 degrees (a related but different task; it sees the
downstream images, so it is only for exercising code, not for results).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

from validation.assets import atomic_build, cache_dir

RECIPE_VERSION = "v1"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIZE = 28

#: Pretraining recipe of :func:`pretrained_vit` (see the module docstring).
PRETRAIN_RECIPE = {
    "epochs": 5,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "batch_size": 128,
    "warmup_frac": 0.05,
    "clip_norm": 1.0,
}

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ----------------------------------------------------------------------------- data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not.

    Parameters
    ----------
    path : path-like
        A ``.gz`` suffix means gzip-compressed.

    Returns
    -------
    numpy.ndarray
        Shape from the header, native byte order.

    Raises
    ------
    ValueError
        If the magic number or the payload size is wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    return parse_idx(data, name=str(path))


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an idx file; see :func:`read_idx`."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{name}: not an idx file (bad magic {data[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{name}: idx header says shape {shape} ({expected} bytes) but "
            f"{len(data) - header} bytes follow"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}; install it with "
        "`apt-get install dataset-fashion-mnist` (or pass folder=...)"
    )


def load_fashion_mnist(split: str = "train", folder: str | os.PathLike | None = None):
    """Load a Fashion-MNIST split as normalized tensors.

    Parameters
    ----------
    split : {"train", "test"}
    folder : path-like, optional
        Folder with the idx files; default ``$FASHION_MNIST_DIR`` or
        ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``).

    Returns
    -------
    images : torch.Tensor
        Float32, ``(n, 1, 28, 28)``, ``(x / 255 - 0.5) / 0.5``.
    labels : torch.Tensor
        Int64, ``(n,)``, in 0..9.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"load_fashion_mnist(split=...) must be 'train' or 'test', got {split!r}")
    folder = Path(folder or os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    img_stem, lab_stem = FASHION_MNIST_FILES[split]
    images = read_idx(_find_idx(folder, img_stem))
    labels = read_idx(_find_idx(folder, lab_stem))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {split}: shapes {images.shape} and {labels.shape}")
    return normalize_unit(torch.from_numpy(images).float()[:, None] / 255.0), torch.from_numpy(
        labels.astype(np.int64)
    )


def normalize_unit(x: torch.Tensor) -> torch.Tensor:
    """Map pixels in [0, 1] to [-1, 1] (``(x - 0.5) / 0.5``), shared by both datasets."""
    return (x - 0.5) / 0.5


def load_digits_images(image_size: int = IMAGE_SIZE):
    """Load sklearn's 8x8 digits, upsampled and normalized like Fashion-MNIST.

    Parameters
    ----------
    image_size : int, default 28
        Output side length (bilinear interpolation, ``align_corners=False``).

    Returns
    -------
    images : torch.Tensor
        Float32, ``(1797, 1, image_size, image_size)``, in [-1, 1].
    labels : torch.Tensor
        Int64, ``(1797,)``.
    """
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"load_digits_images(image_size=...) must be >= 8, got {image_size}")
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return normalize_unit(x.clamp(0.0, 1.0)), torch.from_numpy(bunch.target.astype(np.int64))


@dataclass(frozen=True)
class DigitsTask:
    """A seeded tune/test(/dev) split of an image task; ids are ``"<source>:<row>"``.

    ``dev_*`` (optional) are items in neither tune nor test, for choosing
    hyperparameters (:mod:`validation.sweep`).
    """

    tune_x: torch.Tensor
    tune_y: torch.Tensor
    tune_ids: list[str]
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_ids: list[str]
    dev_x: torch.Tensor | None = None
    dev_y: torch.Tensor | None = None
    dev_ids: list[str] | None = None
    num_labels: int = 10

    def ids(self) -> dict[str, list[str]]:
        """JSON-serializable record of the split."""
        out = {"tune": list(self.tune_ids), "test": list(self.test_ids)}
        if self.dev_ids:
            out["dev"] = list(self.dev_ids)
        return out

    def with_dev_as_test(self) -> DigitsTask:
        """The same task evaluated on its dev items (the test items are dropped)."""
        if self.dev_x is None or not self.dev_ids:
            msg = "this task has no dev items; build it with n_dev > 0"
            raise ValueError(msg)
        return DigitsTask(self.tune_x, self.tune_y, self.tune_ids, self.dev_x, self.dev_y,
                          list(self.dev_ids), num_labels=self.num_labels)


def _split(x, y, ids, seed: int, salt: int, n_tune: int, n_test: int, n_dev: int,
           name: str, num_labels: int) -> DigitsTask:
    """Test = first ``n_test`` of a seeded permutation, tune = the next ``n_tune``, dev = the next ``n_dev``."""
    if n_tune < 1 or n_test < 1 or n_dev < 0 or n_tune + n_test + n_dev > len(y):
        raise ValueError(
            f"{name}: need n_tune >= 1, n_test >= 1, n_dev >= 0 and n_tune + n_test + n_dev "
            f"<= {len(y)}, got n_tune={n_tune}, n_test={n_test}, n_dev={n_dev}"
        )
    order = np.random.default_rng([seed, salt]).permutation(len(y))
    test, tune = order[:n_test], order[n_test : n_test + n_tune]
    dev = order[n_test + n_tune : n_test + n_tune + n_dev]
    pick = lambda idx: (x[torch.from_numpy(idx)], y[torch.from_numpy(idx)],  # noqa: E731
                        [ids[int(i)] for i in idx])
    (tx, ty, tid), (sx, sy, sid) = pick(tune), pick(test)
    dx, dy, did = pick(dev) if n_dev else (None, None, None)
    return DigitsTask(tx, ty, tid, sx, sy, sid, dx, dy, did, num_labels)


def digits_task(
    seed: int = 0, n_tune: int = 500, n_test: int = 500, image_size: int = IMAGE_SIZE,
    n_dev: int = 0,
) -> DigitsTask:
    """Split sklearn digits into disjoint tune, test (and dev) parts.

    Parameters
    ----------
    seed : int, default 0
        Permutation seed; test = first ``n_test``, tune = the next ``n_tune``,
        dev = the next ``n_dev`` (so adding dev items leaves tune and test as they were).
    n_tune, n_test : int, default 500
        Sizes (``n_tune + n_test + n_dev <= 1797``).
    image_size : int, default 28
    n_dev : int, default 0

    Returns
    -------
    DigitsTask
    """
    x, y = load_digits_images(image_size)
    ids = [f"digits:{i}" for i in range(len(y))]
    return _split(x, y, ids, seed, 0xD161, n_tune, n_test, n_dev, "digits_task", 10)


def shifted_digits_task(
    seed: int = 0, n_tune: int = 500, n_test: int = 500, n_dev: int = 0, noise: float = 0.5,
) -> DigitsTask:
    """Digits in a shifted domain: contrast inverted, then Gaussian pixel noise of sd ``noise``.

    The noise is seeded by the row (``default_rng([7, row])``), so an image
    is the same in every split and run. Same split rule as :func:`digits_task`
    (its own permutation); ids are ``"digits-shifted:<row>"``.
    """
    x, y = load_digits_images(IMAGE_SIZE)
    gen = np.random.default_rng([7, len(y)])
    noisy = -x + noise * torch.from_numpy(gen.standard_normal(x.shape).astype(np.float32))
    ids = [f"digits-shifted:{i}" for i in range(len(y))]
    return _split(noisy, y, ids, seed, 0x5D16, n_tune, n_test, n_dev, "shifted_digits_task", 10)


#: Fashion-MNIST classes the ViT of the held-out recipe is pretrained on
#: (trouser, dress, sandal, sneaker, bag, ankle boot) ...
PRETRAIN_CLASSES = (1, 3, 5, 7, 8, 9)
#: ... and the held-out classes of the ``fmnist-tops`` target (T-shirt/top,
#: pullover, coat, shirt): upper-body garments the backbone never saw, the
#: classes Fashion-MNIST classifiers confuse most.
HELDOUT_CLASSES = (0, 2, 4, 6)


def fmnist_tops_task(
    seed: int = 0, n_tune: int = 500, n_test: int = 500, n_dev: int = 0,
    folder: str | os.PathLike | None = None,
) -> DigitsTask:
    """Fashion-MNIST's four upper-body classes, held out of :func:`pretrained_vit`'s pretraining.

    Images come from the Fashion-MNIST training split (the ViT pretrained
    with ``classes=PRETRAIN_CLASSES`` never saw these classes); labels are
    0..3 in the order of :data:`HELDOUT_CLASSES`; ids are
    ``"fmnist-train:<row>"``. Same split rule as :func:`digits_task`.
    """
    x, y = load_fashion_mnist("train", folder)
    rows = np.flatnonzero(np.isin(y.numpy(), HELDOUT_CLASSES))
    relabel = {c: i for i, c in enumerate(HELDOUT_CLASSES)}
    xs = x[torch.from_numpy(rows)]
    ys = torch.tensor([relabel[int(c)] for c in y[torch.from_numpy(rows)]], dtype=torch.int64)
    ids = [f"fmnist-train:{int(r)}" for r in rows]
    return _split(xs, ys, ids, seed, 0xF70B, n_tune, n_test, n_dev, "fmnist_tops_task",
                  len(HELDOUT_CLASSES))


#: Target name -> task builder ``(seed, n_tune, n_test, n_dev) -> DigitsTask``.
TARGETS = {
    "digits": lambda seed, n_tune, n_test, n_dev: digits_task(seed, n_tune, n_test, n_dev=n_dev),
    "digits-shifted": shifted_digits_task,
    "fmnist-tops": fmnist_tops_task,
}


def vision_task(name: str, seed: int, n_tune: int, n_test: int, n_dev: int = 0) -> DigitsTask:
    """The target ``name`` of :data:`TARGETS`, split with ``seed``."""
    if name not in TARGETS:
        msg = f"unknown vision target {name!r}; choose from {sorted(TARGETS)}"
        raise ValueError(msg)
    return TARGETS[name](seed, n_tune, n_test, n_dev)


# ----------------------------------------------------------------------------- models


def vit_config(
    image_size: int = IMAGE_SIZE,
    patch_size: int = 7,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    mlp_ratio: int = 4,
    num_labels: int = 10,
) -> ViTConfig:
    """Return the small ViT config used for pretraining (see the module docstring).

    Parameters
    ----------
    image_size, patch_size, hidden_size, num_hidden_layers, num_attention_heads, \
mlp_ratio, num_labels : int

    Returns
    -------
    transformers.ViTConfig
        One input channel, no dropout.
    """
    if image_size % patch_size:
        raise ValueError(f"vit_config: patch_size={patch_size} must divide image_size={image_size}")
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"vit_config: num_attention_heads={num_attention_heads} must divide "
            f"hidden_size={hidden_size}"
        )
    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=mlp_ratio * hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )


def build_vit(config: ViTConfig, seed: int = 0) -> ViTForImageClassification:
    """Instantiate a randomly initialized ViT with a seeded init (global RNG restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTForImageClassification(config)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """A random tiny ViT for smoke runs: 28x28, patch 7, hidden 32, 2 layers, 2 heads."""
    config = vit_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    return build_vit(config, seed)


def replace_head(
    model: ViTForImageClassification, num_labels: int = 10, seed: int = 0
) -> ViTForImageClassification:
    """Replace ``model.classifier`` by a freshly initialized linear head, in place.

    Parameters
    ----------
    model : transformers.ViTForImageClassification
    num_labels : int, default 10
    seed : int, default 0
        Seed of the head's init (global RNG restored).

    Returns
    -------
    transformers.ViTForImageClassification
        ``model`` itself, with ``config.num_labels`` updated.
    """
    if num_labels < 2:
        raise ValueError(f"replace_head(num_labels=...) must be >= 2, got {num_labels}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(model.config.hidden_size, num_labels)
        torch.nn.init.trunc_normal_(head.weight, std=model.config.initializer_range)
        torch.nn.init.zeros_(head.bias)
    model.classifier = head.to(next(model.parameters()).dtype)
    model.config.num_labels = num_labels
    return model


# ----------------------------------------------------------------------------- training


def _lr_lambda(total: int, warmup_frac: float):
    warmup = max(1, round(warmup_frac * total))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return fn


def train_classifier(
    model: ViTForImageClassification,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 5,
    lr: float = 2e-3,
    batch_size: int = 128,
    weight_decay: float = 0.05,
    warmup_frac: float = 0.05,
    clip_norm: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train every parameter of an image classifier with AdamW + warmup/cosine.

    Parameters
    ----------
    model : transformers.ViTForImageClassification
    images : torch.Tensor
        ``(n, channels, h, w)``, normalized.
    labels : torch.Tensor
        Int64 ``(n,)``.
    epochs, batch_size : int
    lr, weight_decay, warmup_frac, clip_norm : float
    seed : int, default 0
        Shuffling seed.
    progress : bool, default True
        Show a tqdm bar over steps.

    Returns
    -------
    list of float
        Mean training loss per epoch. The model is left in eval mode.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"train_classifier: {len(images)} images vs {len(labels)} labels")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_classifier: epochs={epochs}, batch_size={batch_size} must be >= 1")
    steps_per_epoch = math.ceil(len(images) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = _lr_lambda(epochs * steps_per_epoch, warmup_frac)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="train", disable=not progress, leave=False)
    model.train()
    history = []
    for _ in range(epochs):
        perm, total = torch.randperm(len(images), generator=gen), 0.0
        for s in range(0, len(images), batch_size):
            idx = perm[s : s + batch_size]
            loss = model(pixel_values=images[idx], labels=labels[idx]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update(1)
        history.append(total / len(images))
    bar.close()
    model.eval()
    return history


@torch.inference_mode()
def classifier_accuracy(
    model: ViTForImageClassification, images: torch.Tensor, labels: torch.Tensor,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy of an image classifier (eval mode restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, len(images), batch_size):
        logits = model(pixel_values=images[s : s + batch_size]).logits
        correct += int((logits.argmax(-1) == labels[s : s + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


# ----------------------------------------------------------------------------- pretrained


def _classes_tag(classes: tuple[int, ...] | None) -> str:
    return "" if classes is None else "-c" + "".join(str(c) for c in sorted(classes))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread, then on as many as before.

    A pretraining's float32 sums are split over the threads, and the split
    changes their rounding: the same seed on 1 and on 2 threads gives other
    weights (other :func:`weights_fingerprint`). On one thread the bytes
    depend on the seed, the torch version and the CPU's kernels only.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrained_vit_path(seed: int = 0, classes: tuple[int, ...] | None = None) -> Path:
    """Cache folder of :func:`pretrained_vit` for ``seed`` and ``classes`` (may not exist yet)."""
    return cache_dir() / f"vit-fmnist{_classes_tag(classes)}-{RECIPE_VERSION}-seed{seed}"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every tensor of ``model.state_dict()``: names, dtypes, shapes, bytes.

    Two builds with the same fingerprint hold bit-identical weights, so a
    result can say which pretrained model it started from.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def pretrained_vit(
    seed: int = 0, folder: str | os.PathLike | None = None, progress: bool = True,
    classes: tuple[int, ...] | None = None,
) -> ViTForImageClassification:
    """Return the Fashion-MNIST-pretrained small ViT, training and caching it once.

    Parameters
    ----------
    seed : int, default 0
        Init and shuffling seed; one cache folder per seed.
    folder : path-like, optional
        Fashion-MNIST idx folder (see :func:`load_fashion_mnist`).
    progress : bool, default True
    classes : tuple of int, optional
        Pretrain on these Fashion-MNIST classes only (labels renumbered
        0..len-1 in sorted order), e.g. :data:`PRETRAIN_CLASSES`, so that
        the other classes can be a target the backbone never saw. Default:
        all ten.

    Returns
    -------
    transformers.ViTForImageClassification
        Eval mode, Fashion-MNIST head (replace it with :func:`replace_head`).
        The folder also holds ``pretrain_metrics.json`` with the weights'
        :func:`weights_fingerprint`.

    Raises
    ------
    FileNotFoundError
        If the Fashion-MNIST files are missing (``apt-get install
        dataset-fashion-mnist``) and the model is not cached yet.
    """
    path = pretrained_vit_path(seed, classes)
    if not path.is_dir():
        atomic_build(path, lambda tmp: _pretrain_to(tmp, seed, folder, progress, classes))
    model = ViTForImageClassification.from_pretrained(path, local_files_only=True)
    model.eval()
    return model


def pretrained_vit_metrics(seed: int = 0, classes: tuple[int, ...] | None = None) -> dict:
    """Read the recipe and measured metrics saved next to the cached pretrained ViT."""
    path = pretrained_vit_path(seed, classes) / "pretrain_metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; call pretrained_vit(seed={seed}) first")
    return json.loads(path.read_text())


def _only_classes(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...] | None):
    if classes is None:
        return x, y
    keep = torch.from_numpy(np.isin(y.numpy(), classes))
    relabel = torch.full((10,), -1, dtype=torch.int64)
    relabel[torch.tensor(sorted(classes))] = torch.arange(len(classes))
    return x[keep], relabel[y[keep]]


def _pretrain_to(out: Path, seed: int, folder, progress: bool,
                 classes: tuple[int, ...] | None = None) -> None:
    x_train, y_train = _only_classes(*load_fashion_mnist("train", folder), classes)
    x_test, y_test = _only_classes(*load_fashion_mnist("test", folder), classes)
    model = build_vit(vit_config(num_labels=10 if classes is None else len(classes)), seed)
    start = time.perf_counter()
    with one_thread():
        losses = train_classifier(model, x_train, y_train, seed=seed, progress=progress,
                                  **PRETRAIN_RECIPE)
        threads = torch.get_num_threads()
    seconds = time.perf_counter() - start
    metrics = {
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "classes": None if classes is None else sorted(classes),
        "recipe": PRETRAIN_RECIPE,
        "train_seconds": round(seconds, 1),
        "train_loss_per_epoch": [round(v, 4) for v in losses],
        "fashion_mnist_test_accuracy": classifier_accuracy(model, x_test, y_test),
        "torch_threads": threads,
        "torch": torch.__version__,
        "fingerprint": weights_fingerprint(model),
    }
    model.save_pretrained(out, safe_serialization=True)
    (out / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2))


def tiny_pretrained_vit(
    seed: int = 0, epochs: int = 5, progress: bool = False
) -> ViTForImageClassification:
    """A :func:`tiny_vit` briefly pretrained on 90-degree-rotated digits (smoke path).

    Needs no apt package and no cache; a few seconds on 2 CPU cores.

    Parameters
    ----------
    seed : int, default 0
    epochs : int, default 5
    progress : bool, default False

    Returns
    -------
    transformers.ViTForImageClassification
        Eval mode, 10-class head.
    """
    x, y = load_digits_images(IMAGE_SIZE)
    model = tiny_vit(seed)
    with one_thread():  # the same bytes whatever the caller's thread count
        train_classifier(model, torch.rot90(x, 1, dims=(2, 3)).contiguous(), y, epochs=epochs,
                         lr=3e-3, batch_size=64, seed=seed, progress=progress)
    return model
