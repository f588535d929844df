"""Output folders a command owns: refuse foreign ones, lock them while a run writes, write files
and folders atomically, and name the file when the disk is full. Input files are opened only when
they are regular files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
from pathlib import Path

from .errors import Aimv2Error

LOCK = ".aimv2.lock"
# `.NAME.tmp-PID`: what `atomic_write` / `atomic_folder` build before the rename onto NAME.
TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-\d+")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class FolderInUseError(Aimv2Error, RuntimeError):
    """Another live process holds the output folder's lock."""


class DiskFullError(Aimv2Error, OSError):
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
            raise FolderInUseError(
                f"{folder}: in use by PID {holder} (another aimv2 run writes there)"
            ) from None
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
            raise _disk_full(path, exc.errno) from None
        raise


def temporary_path(path: Path) -> Path:
    """The hidden name beside `path` a write builds under (it matches `TEMPORARY`)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, then rename onto `path`: readers never see a partial file, and a failed
    or interrupted write leaves what was there before."""
    tmp = temporary_path(path)
    try:
        with naming_full_disk(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data, indent: int = 2) -> None:
    """`data` as JSON text at `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent) + "\n"))


@contextlib.contextmanager
def atomic_folder(path: Path):
    """`with atomic_folder(path) as tmp:` fill `tmp`; it is renamed onto `path` when the block
    succeeds and removed when it fails (Ctrl-C included), so `path` is complete or as it was.
    `path` must not exist or be empty by the end of the block. A full disk raises one
    `DiskFullError` naming the file under `path` that could not be written."""
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except DiskFullError:
            raise
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            written = Path(exc.filename) if exc.filename else tmp
            where = path / written.relative_to(tmp) if written.is_relative_to(tmp) else path
            raise _disk_full(where, exc.errno) from None
        with naming_full_disk(path):
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _disk_full(path: Path, number: int) -> DiskFullError:
    reason = os.strerror(number)
    return DiskFullError(
        f"{path}: cannot write, the disk is full ({reason[0].lower()}{reason[1:]})"
    )


def open_regular(path: str | os.PathLike):
    """Open a file for reading only if it is a regular file (a FIFO or device would block or
    never end).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise (
                IsADirectoryError(errno.EISDIR, "is a folder", os.fspath(path))
                if stat.S_ISDIR(mode)
                else OSError(errno.EINVAL, "not a regular file", os.fspath(path))
            )
        os.set_blocking(fd, True)
        # named by its path, as open() names it
        return open(path, "rb", opener=lambda _path, _flags: fd)
    except BaseException:
        os.close(fd)
        raise
