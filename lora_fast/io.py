"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Each write goes to a temporary file beside the target (``.<name>.<random>.tmp``), is flushed to disk, then renamed
over the target (``os.replace`` is atomic on POSIX and Windows). A whole folder (:func:`atomic_directory`) is written
into a temporary sibling and swapped in; a kill between the swap's two renames leaves the old folder in a hidden
sibling, which the next write of that folder, or :func:`recover_directory` (loaders call it), puts back. A weights
file and its config (:func:`atomic_save_tensors`) are written as such a folder, which carries over every other file
already in the old one (hard links), so a reader sees the old pair or the new pair, never one file of each.

Writers of the targets in one folder take turns: each holds an exclusive lock on that folder (``flock`` on its file
descriptor; POSIX only) while it writes, so two processes saving into one folder both succeed, the second after the
first, and the temporaries a killed writer left behind can be removed by the next write without touching a live
writer's. Files and folders get the modes a plain ``open``/``mkdir`` would give them under the process's umask
(``tempfile`` makes its temporaries private, 0600 and 0700; they are widened to ``0o666 & ~umask`` and
``0o777 & ~umask`` before they replace the target).
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
    "folder_problem",
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


_held: dict[str, int] = {}  # folders this process holds the writer lock of, and how many times (nested writes)


@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[None]:
    """Hold the writer lock of ``folder`` (made if missing) for the block: other processes wait for it; this process
    may take it again inside (a folder write whose own steps write). A no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; one writer per folder is then the caller's to keep
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


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
    if not any((old / path.name).is_dir() for old in _ours(path, ("old",))):
        return False
    with _writer_lock(path.parent):  # a writer between its two renames finishes first
        holders = [old for old in _ours(path, ("old",)) if (old / path.name).is_dir()]
        if path.exists() or not holders:  # that writer, or another loader, has put a folder there meanwhile
            return False
        # The newest, should there be several: a holder's mtime is when the old folder was renamed into it.
        holder = max(holders, key=lambda p: p.stat().st_mtime)
        os.replace(holder / path.name, path)
        with contextlib.suppress(OSError):  # now empty; the next write of ``path`` removes any other holder
            holder.rmdir()
        _fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error remove it."""
    path = Path(path)
    with _writer_lock(path.parent):
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
    with _writer_lock(path.parent):
        recover_directory(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                    if f.stat().st_nlink == 1:  # written here (a carried-over file is a second link): the umask's
                        os.chmod(f, 0o666 & ~_umask())  # mode, as open() gives; writers like safetensors make 0600
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


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why no folder can be written at ``path`` (it is a file; its nearest existing ancestor is a file, or a folder
    this process cannot write), or None: what a caller checks before hours of work that end with the write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file"
    ancestor = next(p for p in (path, *path.parents) if p.exists())  # the root always exists
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so no folder can be made under it"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable by this user"
    return None


def _check_folder_path(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder; refusing to replace it: choose a folder path")


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link of ``src`` at ``dst`` (no bytes copied), or a copy where the file system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Every entry of the folder ``old`` but ``skip`` (and our hidden temporaries) into the empty folder ``new``:
    files as hard links, folders as trees of them, symbolic links as links."""
    temporary = re.compile(r"\..+\.[a-z0-9_]{8}\.(?:tmp|old)")
    for entry in old.iterdir():
        if entry.name in skip or temporary.fullmatch(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def atomic_save_tensors(
    directory: str | os.PathLike,
    tensors: dict,
    weights_name: str,
    config_name: str,
    config: dict,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (safetensors, with ``metadata``) and ``config`` (JSON) into the folder ``directory`` as one
    change: a new folder holding both, and every other file of the old folder (``_carry_over``: hard links), is
    swapped in (:func:`atomic_directory`). A reader sees the old pair or the new pair, never the new weights beside
    the old config; a kill leaves the old folder, or (between the swap's two renames) the old folder aside, which
    :func:`recover_directory` puts back. A ``directory`` that is a file is refused."""
    from safetensors.torch import save_file

    directory = Path(directory)
    metadata = {"format": "pt", **(metadata or {})}
    with atomic_directory(directory) as tmp:
        if directory.is_dir():
            _carry_over(directory, tmp, {weights_name, config_name})
        save_file(tensors, str(tmp / weights_name), metadata=metadata)
        (tmp / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
