"""Which images a run covers: folders, file lists and WebDataset tars, as one sorted list.

Every image becomes an `Item` with a stable key (its relative POSIX path) so that row order,
shard boundaries and per-rank ranges depend only on the input, never on the walk order.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingError
from ..folders import open_regular

# Every image source (folders, lists, tars, captioned data) takes these; the order is the preference
# when a WebDataset sample holds several images under one key.
IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
)


@dataclass(frozen=True)
class Item:
    """One image to embed: where its bytes are, and what the outputs call it."""

    key: str  # relative POSIX path; undecodable bytes of a name appear as \xNN
    path: str  # the file on disk (the tar itself for tar members)
    size: int
    mtime: float
    offset: int = -1  # start of the member's data inside a tar; -1 for plain files

    def open(self):
        """A binary file object with the image's bytes."""
        if self.offset < 0:
            return open_regular(self.path)
        return io.BytesIO(read_member(self.path, self.offset, self.size))


def read_member(tar_path, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of a tar (a member's data), read without parsing the tar again;
    a tar cut short since it was listed is an OSError, not a short read."""
    with open_regular(tar_path) as tar:
        if offset + size > os.fstat(tar.fileno()).st_size:
            raise OSError("the tar ends inside this member")
        tar.seek(offset)
        return tar.read(size)


def display(name: str | bytes) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 are shown as \\xNN."""
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    return raw.decode("utf-8", "backslashreplace")


def discover(inputs: list[str | os.PathLike]) -> list[Item]:
    """All images under `inputs`, sorted by key, each file once.

    A folder is searched recursively; symlinks are followed, but never into a folder that is
    already being walked (no cycles), and a file reached twice (by a link or a second input)
    is kept once, under its first key. Hidden entries (".*", AppleDouble "._*") are skipped.
    A `.tar` is read as a WebDataset shard (img2dataset layout), an image file is itself the
    image, and any other file is a list of image paths, one a line, relative to the list's
    folder. With several inputs, each key starts with its input's name.
    """
    if not inputs:
        raise SettingError("no inputs given")
    found: list[tuple[bytes, Item, tuple]] = []
    names = set()
    for source in inputs:
        root = Path(source).expanduser()
        prefix = "" if len(inputs) == 1 else root.name + "/"
        if prefix and prefix in names:
            raise SettingError(
                f"{source}: two inputs are named {root.name!r}; their keys would collide"
            )
        names.add(prefix)
        if root.is_dir():
            found += _walk(root, prefix)
        elif root.is_file() and root.suffix.lower() == ".tar":
            found += _tar_members(root, prefix)
        elif root.is_file() and root.suffix.lower() in IMAGE_SUFFIXES:
            found.append(_entry(os.fsencode(root.name), str(root), root.stat()))
        elif root.is_file():
            found += _listed(root, prefix)
        elif root.exists():
            raise FileNotFoundError(f"{source}: not a regular file or folder")
        else:
            raise FileNotFoundError(f"{source}: no such file or folder")
    found.sort(key=lambda entry: entry[0])
    seen, items = set(), []
    for _, item, identity in found:
        if identity not in seen:
            seen.add(identity)
            items.append(item)
    return items


def _entry(key_bytes: bytes, path: str, stat: os.stat_result, identity=None, offset: int = -1):
    item = Item(display(key_bytes), path, stat.st_size, stat.st_mtime, offset)
    return key_bytes, item, identity or (stat.st_dev, stat.st_ino)


def _walk(root: Path, prefix: str):
    entries = []
    stack = [(os.fsencode(root), b"", frozenset())]
    while stack:
        folder, rel, ancestors = stack.pop()
        real = os.path.realpath(folder)
        if real in ancestors:
            continue  # a link back into the walk: following it would loop
        ancestors = ancestors | {real}
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for child in children:
            if child.name.startswith(b"."):
                continue
            key = rel + child.name
            try:
                if child.is_dir():
                    stack.append((child.path, key + b"/", ancestors))
                # never a FIFO or device
                elif child.is_file() and _suffix(child.name) in IMAGE_SUFFIXES:
                    entries.append(
                        _entry(os.fsencode(prefix) + key, os.fsdecode(child.path), child.stat())
                    )
            except OSError:  # a dangling link or a file removed during the walk
                continue
    return entries


def _suffix(name: bytes) -> str:
    return os.path.splitext(name)[1].lower().decode("ascii", "replace")


def _tar_members(tar_path: Path, prefix: str):
    entries = []
    stat = tar_path.stat()
    with tarfile.open(tar_path) as tar:
        for member in tar:
            name = Path(member.name)
            if not member.isfile() or any(p.startswith(".") for p in name.parts):
                continue
            if name.suffix.lower() in IMAGE_SUFFIXES:
                key = f"{prefix}{member.name}".encode("utf-8", "surrogateescape")
                item_stat = os.stat_result((0, 0, 0, 0, 0, 0, member.size, 0, member.mtime, 0))
                identity = (stat.st_dev, stat.st_ino, member.offset_data)
                entries.append(_entry(key, str(tar_path), item_stat, identity, member.offset_data))
    return entries


def _listed(list_path: Path, prefix: str):
    entries = []
    base = list_path.parent
    for line in list_path.read_text(errors="surrogateescape").removeprefix("\ufeff").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = base / line
        try:
            stat = path.stat()
        except OSError:
            stat = os.stat_result((0,) * 10)  # missing: kept, so the run reports it as a failure
            entries.append(
                _entry(os.fsencode(prefix + line), str(path), stat, ("missing", str(path)))
            )
            continue
        entries.append(_entry(os.fsencode(prefix + line), str(path), stat))
    return entries


def images_under(folder: str | os.PathLike) -> list[Path]:
    """Every image file under `folder` (the rules of `discover`), as paths, sorted by key."""
    return [Path(item.path) for item in discover([folder]) if item.offset < 0]
