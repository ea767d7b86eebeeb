"""Atomic, durable writes: a temp file in the same directory, fsync, os.replace, then fsync of the directory.

A crash or Ctrl-C mid-write leaves the previous file intact and at most a
hidden ``.<name>.tmp-*`` file, never a half-written target. The directory's
fsync makes the rename itself durable: without it a power cut soon after the
rename can bring back the old name (ext4, xfs), and a folder made for the file
(a run's ``checkpoints/``) is synced into its parent the same way. A write that
the disk refuses (full, read-only, a quota) is one ``StorageError`` line naming
the file, and the previous file stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from metalearn.errors import StorageError

log = logging.getLogger("metalearn")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    try:
        made = make_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise _refused(path, e) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the target gets the usual permissions
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno not in _DISK_ERRORS:  # not the disk's refusal: e.g. a download's URLError inside the block
            raise
        raise _refused(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename durable, and each folder made for it in its parent
        for folder in (path.parent, *(f.parent for f in made)):
            fsync_dir(folder)
    except OSError as e:  # the new file is in place; only its durability against a power cut is not assured
        log.warning("%s is written, but its folder could not be synced to disk (%s)", path, e.strerror or e)


def make_dirs(folder: Path) -> list[Path]:
    """``folder`` and its missing parents made (``mkdir -p``); the ones this call made, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return list(reversed(missing))


def sync_file_system(folder: str | os.PathLike) -> None:
    """Flush every file of the file system that holds ``folder`` to disk (Linux ``syncfs``; elsewhere ``sync``):
    one call for a folder of thousands of new files, where an fsync each would take minutes."""
    import ctypes
    import ctypes.util

    fd = os.open(folder, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    except OSError:
        os.sync()
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a directory: its entries (a rename, a new file or folder) survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that cannot sync directories (some FUSE, NFS)
            raise
    finally:
        os.close(fd)


#: What a file system answers when it refuses a write to a file already made (a missing file read inside
#: the block, ENOENT, stays the caller's error).
_DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _refused(path: Path, e: OSError) -> StorageError:
    kept = f"; the previous {path.name} is kept" if path.exists() else ""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = "free space on that disk, or put the run on another one (hydra.run.dir=...)"
    else:
        fix = "make that folder writable, or put the run elsewhere (hydra.run.dir=...)"
    return StorageError(f"cannot write {path}: {e.strerror or e}{kept}; {fix}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    # Serialised in memory first: torch's own file writer reports a full disk as a RuntimeError without
    # an errno; Python's write raises the OSError that names it.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
