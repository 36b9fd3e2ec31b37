"""Atomic writes: a file or a whole folder appears complete, or the previous one stays.

Both helpers write to a temporary sibling (same directory, hence the same
file system) and move it into place with :func:`os.replace`, which is atomic
on POSIX and Windows. They clean up on **every** exception, not only
``OSError``: a ``KeyboardInterrupt`` (Ctrl-C) arriving at any step leaves
either the previous contents or the new ones at the path, never neither and
never a half-written mix, and removes the temporary sibling.

A folder cannot be swapped with one rename while it exists, so
:func:`replace_folder` takes two: the old folder is moved aside, the new one
moved in, and the old one deleted. If anything interrupts the step between
the two renames, the handler moves the old folder back before re-raising.

No torch import here: the core and the torch adapter share these helpers.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "replace_folder"]


def _refuse_directory(path: Path, name: str) -> None:
    if path.is_dir():
        msg = f"`{name}` {path} is a directory; pass the path of a file to write"
        raise ValueError(msg)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, name: str = "path") -> Path:
    """Create or replace the file ``path`` with what ``write(tmp)`` puts in ``tmp``.

    Parameters
    ----------
    path : path
        The file to create or replace. Its parent folders are created.
    write : callable
        ``write(tmp)`` writes the complete new file at ``tmp`` (a path in
        the same folder as ``path``).
    name : str, optional
        The argument name used in error messages.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``path`` is an existing directory.

    Notes
    -----
    On any exception raised by ``write`` or by the rename (``BaseException``,
    so ``KeyboardInterrupt`` too) the temporary file is removed and the
    previous file at ``path``, if any, is untouched.
    """
    path = Path(path)
    _refuse_directory(path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, raw = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(raw)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _aside_name(folder: Path) -> Path:
    """A fresh hidden sibling name for the previous folder while it is swapped out."""
    while True:
        aside = folder.with_name(f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        if not os.path.lexists(aside):
            return aside


def _swap(tmp: Path, folder: Path) -> None:
    """Move ``tmp`` to ``folder``; an existing ``folder`` is moved aside and deleted after."""
    if not os.path.lexists(folder):
        os.replace(tmp, folder)
        return
    aside = _aside_name(folder)
    try:
        os.replace(folder, aside)
        os.replace(tmp, folder)
    except BaseException:
        # interrupted between (or during) the two renames: put the previous folder back
        if not os.path.lexists(folder) and os.path.lexists(aside):
            os.replace(aside, folder)
        raise
    finally:
        if os.path.lexists(aside) and os.path.lexists(folder):
            _remove_tree(aside)


def _remove_tree(path: Path) -> None:
    """``rmtree``, finished even if one interruption arrives while it runs."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)


def replace_folder(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create or replace the folder ``folder`` with what ``fill(tmp)`` writes in ``tmp``.

    The caller decides whether ``folder`` may be replaced; this helper only
    makes the replacement atomic.

    Parameters
    ----------
    folder : path
        The folder to create or replace (its parents are created).
    fill : callable
        ``fill(tmp)`` writes the complete new contents into the empty folder
        ``tmp``, a hidden sibling of ``folder``.

    Returns
    -------
    Path
        ``folder``.

    Notes
    -----
    Whatever exception interrupts it (``KeyboardInterrupt`` included), at
    whatever step, ``folder`` afterwards holds either its previous contents
    or the complete new ones, and no temporary sibling is left behind. Once
    the new folder is in place the previous one is deleted; the whole
    previous folder is replaced, so callers must check what it holds first.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new-", dir=folder.parent))
    try:
        fill(tmp)
        _swap(tmp, folder)
    finally:
        if os.path.lexists(tmp):
            _remove_tree(tmp)
    return folder
