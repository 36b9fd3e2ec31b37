"""Saving never destroys a user's files, and an interrupted save keeps the previous model.

``save_compressed`` replaces only a folder that is new, empty, or holds what
an earlier ``save_compressed`` wrote; it refuses an existing file, a folder
with other files in it (unless ``overwrite=True``) and the working
directory. Its atomic swap is interrupted at every step, with an error and
with ``KeyboardInterrupt``: the folder then holds the previous model or the
new one, complete, and nothing else is left behind. The same for
``CalibrationStats.save``. ``docs/failure-modes.md`` lists these promises.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from jactus_linalg import _files
from jactus_linalg.torch import (
    CalibrationStats,
    calibrate,
    core_parameters,
    load_compressed,
    save_compressed,
)
from jactus_linalg.torch import io as jio
from jactus_linalg.torch import stats as jstats

from .tiny_mlp import (
    assert_bit_identical,
    compressed_mlp,
    make_batches,
    make_mlp,
    mlp_loss,
    stat_tensors,
)


@pytest.fixture(scope="module")
def two_models():
    """A compressed MLP and a copy whose first core differs (a "new" model to save over it)."""
    model, batches = compressed_mlp()
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(core_parameters(changed))).add_(1.0)
    return model, changed, batches


def _loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_compressed(folder, model=make_mlp(seed=7)).state_dict()


def _entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_save_refuses_a_folder_holding_other_files(tmp_path, two_models):
    """A `notes.txt` or a subfolder beside the model is never deleted without `overwrite=True`."""
    model, changed, _ = two_models
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"`folder` .*m was not written by save_compressed.*"
                       r"notes\.txt.*overwrite=True"):
        save_compressed(model, folder)
    assert _entries(folder) == ["notes.txt", "sub"]
    # a folder holding an earlier save plus a user's file: refused too
    other = save_compressed(model, tmp_path / "other")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files.*\['notes\.txt'\]"):
        save_compressed(changed, other)
    assert (other / "notes.txt").read_text() == "mine"
    assert_bit_identical(_loaded_state(other), model.state_dict())
    # asked explicitly: the whole folder is replaced
    save_compressed(changed, folder, overwrite=True)
    assert _entries(folder) == ["jactus.json", "model.safetensors"]
    assert_bit_identical(_loaded_state(folder), changed.state_dict())
    assert _entries(tmp_path) == ["m", "other"]  # no temporary sibling left


def test_save_replaces_its_own_files_and_fills_an_empty_folder(tmp_path, two_models):
    model, changed, _ = two_models
    empty = tmp_path / "empty"
    empty.mkdir()
    save_compressed(model, empty)
    assert _entries(empty) == ["jactus.json", "model.safetensors"]
    save_compressed(changed, empty)  # only its own files are there: replaced
    assert_bit_identical(_loaded_state(empty), changed.state_dict())
    assert _entries(tmp_path) == ["empty"]


def test_save_refuses_an_existing_file(tmp_path, two_models):
    """The file is neither moved aside nor turned into a folder."""
    model, _, _ = two_models
    path = tmp_path / "model"
    path.write_text("a file the user keeps")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=rf"`folder` {path} is an existing file"):
            save_compressed(model, path, overwrite=overwrite)
    assert path.read_text() == "a file the user keeps"
    assert _entries(tmp_path) == ["model"]


def test_save_refuses_the_working_directory(tmp_path, two_models, monkeypatch):
    """Saving to `.` (or a parent of it) would rename the working directory: always refused."""
    model, _, _ = two_models
    work = tmp_path / "work"
    work.mkdir()
    (work / "script.py").write_text("print('mine')")
    monkeypatch.chdir(work)
    for folder in (".", "..", work):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=r"working directory or one of its parents"):
                save_compressed(model, folder, overwrite=overwrite)
    assert _entries(work) == ["script.py"]
    assert _entries(tmp_path) == ["work"]


def test_save_refuses_a_symbolic_link(tmp_path, two_models):
    model, _, _ = two_models
    target = save_compressed(model, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(ValueError, match=r"`folder` .*link is a symbolic link"):
        save_compressed(model, link, overwrite=True)
    assert link.is_symlink()


class _Interrupt:
    """Raise ``exc`` at the ``call``-th call of a patched function, before or after it runs."""

    def __init__(self, real, call: int, exc: BaseException, after: bool = False):
        self.real, self.call, self.exc, self.after, self.calls = real, call, exc, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls != self.call:
            return self.real(*args, **kwargs)
        if self.after:
            self.real(*args, **kwargs)
        raise self.exc


#: (patched object, attribute, which call, raise after the call ran, the new model is in place)
_SAVE_STEPS = {
    "writing the weights": (jio, "save_file", 1, False, False),
    "writing jactus.json": (Path, "write_text", 1, False, False),
    "moving the old folder aside": (os, "replace", 1, False, False),
    "just after moving it aside": (os, "replace", 1, True, False),
    "moving the new folder in": (os, "replace", 2, False, False),
    "just after moving it in": (os, "replace", 2, True, True),
    "deleting the old folder": (_files.shutil, "rmtree", 1, False, True),
}


@pytest.mark.parametrize("exc", [KeyboardInterrupt("Ctrl-C"), RuntimeError("disk gone")],
                         ids=["KeyboardInterrupt", "RuntimeError"])
@pytest.mark.parametrize("step", list(_SAVE_STEPS))
def test_interrupted_save_keeps_the_previous_model(tmp_path, two_models, monkeypatch, step, exc):
    """Interrupted at each step of the swap, the folder holds one complete model.

    Before the new folder is in place: the previous model, bit for bit. After
    that: the new one. Never neither, never a temporary sibling left behind.
    """
    model, changed, batches = two_models
    folder = save_compressed(model, tmp_path / "m")
    owner, attr, call, after, new_in_place = _SAVE_STEPS[step]
    interrupt = _Interrupt(getattr(owner, attr), call, exc, after)
    monkeypatch.setattr(owner, attr, interrupt)
    with pytest.raises(type(exc)):
        save_compressed(changed, folder)
    monkeypatch.undo()
    assert interrupt.calls >= call, f"the save never reached step {step!r}"
    assert _entries(tmp_path) == ["m"]
    assert _entries(folder) == ["jactus.json", "model.safetensors"]
    expected = changed if new_in_place else model
    loaded = load_compressed(folder, model=make_mlp(seed=7))
    assert_bit_identical(loaded.state_dict(), expected.state_dict())
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))


@pytest.mark.parametrize("step", ["writing the weights", "moving the new folder in"])
def test_interrupted_first_save_leaves_nothing(tmp_path, two_models, monkeypatch, step):
    model, _, _ = two_models
    owner, attr, _, after, _ = _SAVE_STEPS[step]
    monkeypatch.setattr(owner, attr, _Interrupt(getattr(owner, attr), 1, KeyboardInterrupt(), after))
    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, tmp_path / "m")
    monkeypatch.undo()
    assert _entries(tmp_path) == []


@pytest.mark.parametrize(
    ("step", "after"),
    [("save_file", False), ("replace", False), ("replace", True)],
    ids=["writing", "before the rename", "after the rename"],
)
def test_interrupted_statistics_save_keeps_the_previous_file(tmp_path, monkeypatch, step, after):
    """`CalibrationStats.save` (a checkpoint) is atomic in the same way."""
    path = tmp_path / "calib.safetensors"
    first = calibrate(make_mlp(), make_batches(n=2), mlp_loss, progress=False)
    first.save(path)
    second = calibrate(make_mlp(), make_batches(n=3), mlp_loss, progress=False)
    owner = jstats if step == "save_file" else os
    monkeypatch.setattr(owner, step, _Interrupt(getattr(owner, step), 1, KeyboardInterrupt(), after))
    with pytest.raises(KeyboardInterrupt):
        second.save(path)
    monkeypatch.undo()
    assert _entries(tmp_path) == ["calib.safetensors"]
    expected = second if after else first
    assert_bit_identical(stat_tensors(CalibrationStats.load(path)), stat_tensors(expected))


def test_statistics_save_refuses_a_directory_or_another_suffix(tmp_path):
    stats = calibrate(make_mlp(), make_batches(n=1), mlp_loss, progress=False)
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    with pytest.raises(ValueError, match=rf"`path` {folder} is a directory"):
        stats.save(folder)
    with pytest.raises(ValueError, match=r"`path` must be a \.safetensors file.*calib\.pt"):
        stats.save(tmp_path / "calib.pt")
    assert _entries(tmp_path) == ["x.safetensors"]
