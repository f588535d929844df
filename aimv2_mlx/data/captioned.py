"""Image + caption pairs from (a) a folder with `.txt` sidecars, (b) a JSONL/CSV list of
`path,caption`, (c) WebDataset tars (img2dataset output: `KEY.jpg` + `KEY.txt` per sample).

A source is a list of samples with random access (`source[i]` -> (RGB image, caption)), so a
training run can address any position of its data order and resume there exactly.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import Aimv2Error
from ..images import ImageError, open_image
from .sources import IMAGE_SUFFIXES, images_under, read_member


class CaptionDataError(Aimv2Error, ValueError):
    """Captioned data that cannot be used; the message names the file and the reason."""


@dataclass
class CaptionedSample:
    name: str  # how the sample is recorded: a relative path, or "tar:member"
    caption: str
    path: Path | None = None  # an image file, or the tar holding it
    member: str | None = None  # the image's member name inside `path` when it is a tar
    offset: int = -1  # where the member's bytes start inside the tar
    size: int = 0  # how many bytes it has


class CaptionedImages:
    def __init__(self, samples: list[CaptionedSample], origin: str):
        if not samples:
            raise CaptionDataError(f"{origin}: no image + caption pairs found")
        self.samples = samples
        self.origin = origin

    def __len__(self) -> int:
        return len(self.samples)

    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        """Safe from several threads at once: each call opens the file it reads."""
        sample = self.samples[index]
        if sample.member is None:
            return open_image(sample.path), sample.caption
        name = f"{sample.path}:{sample.member}"
        try:
            data = read_member(sample.path, sample.offset, sample.size)
        except OSError as exc:
            raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
        return open_image(io.BytesIO(data), name=name), sample.caption


def load_captioned(source: str | os.PathLike) -> CaptionedImages:
    """A folder (sidecars, or tars inside it), a `.jsonl`/`.csv` list, or a `.tar` file."""
    source = Path(source).expanduser()
    if source.is_dir():
        tars = sorted(path for path in source.glob("*.tar") if path.is_file())
        return from_tars(tars, str(source)) if tars else from_sidecars(source)
    if not source.is_file():
        raise CaptionDataError(f"{source}: no such folder or caption file")
    if source.suffix == ".tar":
        return from_tars([source], str(source))
    if source.suffix in (".jsonl", ".csv", ".tsv"):
        return from_list(source)
    raise CaptionDataError(f"{source}: not a folder, .jsonl, .csv or .tar")


def from_sidecars(folder: Path) -> CaptionedImages:
    """Every image under `folder` that has a same-named `.txt` caption beside it."""
    samples = []
    for path in images_under(folder):
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            samples.append(
                CaptionedSample(path.relative_to(folder).as_posix(), _read_caption(sidecar), path)
            )
    return CaptionedImages(samples, str(folder))


def from_list(path: Path) -> CaptionedImages:
    """Rows with `path` and `caption`; relative paths are taken from the list's folder."""
    rows = []
    try:
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise CaptionDataError(f"{path}:{number}: not JSON ({exc.msg})") from None
        else:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
                rows = [(number, row) for number, row in enumerate(reader, 2)]
    except UnicodeDecodeError:
        raise CaptionDataError(f"{path}: not a UTF-8 text file") from None
    samples = []
    for number, row in rows:
        if not isinstance(row, dict) or not row.get("path") or row.get("caption") is None:
            raise CaptionDataError(f"{path}:{number}: needs 'path' and 'caption'")
        image = Path(row["path"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        samples.append(CaptionedSample(str(row["path"]), _clean(str(row["caption"])), image))
    return CaptionedImages(samples, str(path))


def from_tars(tars: list[Path], origin: str) -> CaptionedImages:
    """WebDataset shards: members grouped by key (name up to the first dot after the folder)."""
    samples = []
    for tar_path in tars:
        try:
            with tarfile.open(tar_path) as tar:
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in tar.getmembers():
                    if member.isfile():
                        folder, _, base = member.name.rpartition("/")
                        key, _, ext = base.partition(".")
                        groups.setdefault(f"{folder}/{key}", {})["." + ext.lower()] = member
                for key in sorted(groups):
                    parts = groups[key]
                    image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
                    if image is not None and ".txt" in parts:
                        text = tar.extractfile(parts[".txt"]).read().decode("utf-8", "replace")
                        samples.append(
                            CaptionedSample(
                                f"{tar_path.name}:{image.name}",
                                _clean(text),
                                tar_path,
                                image.name,
                                image.offset_data,
                                image.size,
                            )
                        )
        except (tarfile.TarError, OSError) as exc:
            raise CaptionDataError(f"{tar_path}: not a readable tar ({exc})") from None
    return CaptionedImages(samples, origin)


def _read_caption(sidecar: Path) -> str:
    """A sidecar's text; bytes that are not UTF-8 become U+FFFD, as in tar captions."""
    try:
        return _clean(sidecar.read_bytes().decode("utf-8-sig", "replace"))
    except OSError as exc:
        raise CaptionDataError(f"{sidecar}: cannot read ({exc.strerror or exc})") from None


def _clean(text: str) -> str:
    return " ".join(text.split())
