"""Output folders a command owns: refuse foreign ones, lock them while a run writes, and name the
file when the disk is full. Input files are opened only when they are regular files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path

LOCK = ".aimv2.lock"
_FULL = (errno.ENOSPC, errno.EDQUOT)


class FolderInUseError(RuntimeError):
    """Another live process holds the output folder's lock."""


class DiskFullError(OSError):
    """A write failed because the disk (or quota) is full; the message names the file."""


def is_empty(folder: Path) -> bool:
    """True for a missing folder or one holding nothing but a lock file (or Finder's .DS_Store)."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: exists and is not a folder")
    return all(entry.name in (LOCK, ".DS_Store") for entry in os.scandir(folder))


@contextlib.contextmanager
def locked(folder: Path):
    """Hold an exclusive `flock` on `folder/.aimv2.lock` (holding our PID) for the block.

    The kernel drops the lock when its holder dies, so a lock file left by a killed run is simply
    taken over. The file is removed on exit; a waiter that locked the removed file retries.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUseError(f"{folder}: in use by PID {holder} (another aimv2 run writes there)") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def naming_full_disk(path: Path):
    """Turn ENOSPC/EDQUOT raised while writing `path` into one `DiskFullError` naming it."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno in _FULL:
            raise DiskFullError(f"{path}: cannot write, the disk is full ({os.strerror(exc.errno)})") from None
        raise


def open_regular(path: str | os.PathLike):
    """Open a file for reading only if it is a regular file (a FIFO or device would block or never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder", os.fspath(path)) if stat.S_ISDIR(mode) else \
                OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        return open(path, "rb", opener=lambda _path, _flags: fd)  # named by its path, as open() names it
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def staged_folder(path: Path):
    """Build a new folder under a hidden sibling name and rename it onto `path` at the end.

    A failure (or Ctrl-C) removes the sibling, so `path` is either complete or absent; a full disk
    is named as `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with naming_full_disk(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
