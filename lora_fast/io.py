"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Each write goes to a temporary file beside the target (``.<name>.<random>.tmp``), is flushed to disk, then renamed
over the target (``os.replace`` is atomic on POSIX and Windows). A whole folder (:func:`atomic_directory`) is written
into a temporary sibling and swapped in; a kill between the swap's two renames leaves the old folder in a hidden
sibling, which the next write of that folder, or :func:`recover_directory` (loaders call it), puts back. A weights
file and its config (:func:`atomic_save_tensors`) are either such a folder, or two atomic files in a folder whose
other files are left alone. Temporaries a killed process left behind are removed by the next successful write of the
same target: one writer per target at a time. Files and folders get the modes a plain ``open``/``mkdir`` would give
them under the process's umask (``tempfile`` makes its temporaries private, 0600 and 0700; they are widened to
``0o666 & ~umask`` and ``0o777 & ~umask`` before they replace the target).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_directory",
    "atomic_save_tensors",
    "recover_directory",
]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Linux (4.7 and later) reports the umask here, so it can be read without changing it.
_PROC_STATUS = "/proc/self/status"


def _umask() -> int:
    """The process's umask: the ``Umask:`` line of ``/proc/self/status`` where there is one; elsewhere by setting it
    and putting it straight back (there is no read-only call; a file another thread creates in between gets 0o022's
    modes)."""
    with contextlib.suppress(OSError, ValueError), open(_PROC_STATUS) as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ours(path: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """The temporaries of our own naming (``.<name>.<8 random chars>.<suffix>``, files or folders) beside ``path``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.(?:{'|'.join(suffixes)})")
    with contextlib.suppress(OSError):
        yield from (p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def _remove_stale(path: Path, suffixes: tuple[str, ...] = ("tmp",)) -> None:
    """Remove the temporaries that a killed write of ``path`` left beside it."""
    for stale in list(_ours(path, suffixes)):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def recover_directory(path: str | os.PathLike) -> bool:
    """Put back the folder ``path`` when a write by :func:`atomic_directory` was killed between its two renames: the
    old folder then sits alone in a hidden ``.<name>.<random>.old/`` beside ``path``, and ``path`` is missing. Returns
    whether a folder was put back. Called by every atomic write of a folder before it starts, and by loaders before
    they read; it moves a folder, so it too is a writer of ``path`` (not to be run while another process writes it)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return False
    holders = [old for old in _ours(path, ("old",)) if (old / path.name).is_dir()]
    if not holders:
        return False
    # The newest, should there be several: a holder's mtime is when the old folder was renamed into it.
    holder = max(holders, key=lambda p: p.stat().st_mtime)
    try:
        os.replace(holder / path.name, path)
    except OSError:
        if path.is_dir():  # another process (a DDP rank loading the same folder) put it back first
            return False
        raise
    with contextlib.suppress(OSError):  # now empty; the next write of ``path`` removes any other holder
        holder.rmdir()
    _fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; refusing to replace it with a file")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    _remove_stale(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with _atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with _atomic_file(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``path`` (any old folder there is removed only after
    the new one is in place). On error the temporary folder is removed and ``path`` is untouched. A kill between the
    two renames leaves the old folder in a hidden ``.old`` sibling: :func:`recover_directory` (run here first, and by
    loaders) puts it back."""
    path = Path(path)
    _check_folder_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(path, ("tmp", "old"))


def _check_folder_path(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder; refusing to replace it: choose a folder path")


def atomic_save_tensors(
    directory: str | os.PathLike,
    tensors: dict,
    weights_name: str,
    config_name: str,
    config: dict,
    metadata: dict[str, str] | None = None,
    whole_folder: bool = True,
) -> Path:
    """Write ``tensors`` (safetensors, with ``metadata``) and ``config`` (JSON) as the folder ``directory``.

    ``whole_folder``: the folder is written whole and swapped in (:func:`atomic_directory`), so it holds these two
    files only. Otherwise the two files are written into ``directory`` and other files there are left alone: both
    are written in full before either replaces its target, the weights first, the config second, so a reader sees
    the old pair, the new pair, or (after a crash between the two renames) the new weights beside the old config;
    loaders check that the two fit together (shapes; for adapters, the fields recorded in the weights' metadata).
    Either way a ``directory`` that is a file is refused.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    metadata = {"format": "pt", **(metadata or {})}
    if whole_folder:
        with atomic_directory(directory) as tmp:
            save_file(tensors, str(tmp / weights_name), metadata=metadata)
            (tmp / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory
    _check_folder_path(directory)
    recover_directory(directory)  # a folder a killed whole-folder write left aside: its other files are kept too
    directory.mkdir(parents=True, exist_ok=True)
    with _atomic_file(directory / config_name) as config_tmp, _atomic_file(directory / weights_name) as weights_tmp:
        save_file(tensors, str(weights_tmp), metadata=metadata)
        config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Folders a killed whole-folder write of this path left beside it (".<name>.<random>.tmp/.old").
    _remove_stale(directory, ("tmp", "old"))
    return directory
