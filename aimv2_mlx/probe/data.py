"""Labelled images for probing: an ImageFolder tree (`root/class/*.jpg`) or a CSV/parquet label
file with `path,label` columns, and a stratified, seeded split that is saved with the results.

Problems that leave something useful are warnings (an empty class folder is skipped; label rows
naming missing files are excluded and listed); problems that leave nothing to train are errors.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..data.sources import IMAGE_SUFFIXES, images_under
from ..errors import Aimv2Error
from ..folders import write_json


class ProbeDataError(Aimv2Error, ValueError):
    """Labelled data a probe cannot use; the message names the file or folder and the reason."""


@dataclass
class LabelledImages:
    paths: list[Path]
    names: list[str]  # how each image is recorded: path relative to the data's root, POSIX style
    labels: list[str]
    warnings: list[str] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)  # {"path", "reason"} of excluded rows

    def subset(self, index) -> LabelledImages:
        return LabelledImages(
            [self.paths[i] for i in index],
            [self.names[i] for i in index],
            [self.labels[i] for i in index],
        )


def load_labelled(source: str | Path) -> LabelledImages:
    """An ImageFolder root or a `.csv`/`.tsv`/`.parquet` label file."""
    source = Path(source).expanduser()
    if source.is_dir():
        return image_folder(source)
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        raise ProbeDataError(
            f"{source}: one image; a probe needs labelled images: a folder "
            f"(root/<class>/<images>) or a .csv/.parquet label file with path,label columns"
        )
    if source.is_file():
        return label_file(source)
    raise ProbeDataError(f"{source}: no such folder or label file")


def image_folder(root: Path) -> LabelledImages:
    data = LabelledImages([], [], [])
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ProbeDataError(f"{root}: no class folders (expected {root}/<class>/<images>)")
    for folder in folders:
        files = images_under(folder)
        if not files:
            data.warnings.append(f"{folder}: empty class folder (no images), skipped")
            continue
        for path in files:
            data.paths.append(path)
            data.names.append(path.relative_to(root).as_posix())
            data.labels.append(folder.name)
    _check_classes(data, root)
    return data


def label_file(path: Path) -> LabelledImages:
    rows = _read_rows(path)
    data = LabelledImages([], [], [])
    for row_number, (name, label) in enumerate(rows, start=2):
        if not name or label is None or str(label) == "":
            raise ProbeDataError(f"{path}: row {row_number} has an empty path or label")
        image = Path(name).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            data.missing.append(
                {"path": str(name), "reason": "no such file (named in the label file)"}
            )
            continue
        data.paths.append(image)
        data.names.append(str(name))
        data.labels.append(str(label))
    if data.missing:
        first = data.missing[0]["path"]
        data.warnings.append(
            f"{path}: {len(data.missing)} listed image(s) do not exist (first: {first}); excluded"
        )
    if not data.paths:
        raise ProbeDataError(f"{path}: none of the {len(rows)} listed images exist")
    _check_classes(data, path)
    return data


def _read_rows(path: Path) -> list[tuple[str, str]]:
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        columns = set(table.column_names)
        if not {"path", "label"} <= columns:
            raise ProbeDataError(
                f"{path}: needs 'path' and 'label' columns (has {', '.join(sorted(columns))})"
            )
        return list(
            zip(table.column("path").to_pylist(), table.column("label").to_pylist(), strict=True)
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise ProbeDataError(f"{path}: needs a header with 'path' and 'label' columns")
            return [(row["path"], row["label"]) for row in reader]
    except UnicodeDecodeError:
        raise ProbeDataError(
            f"{path}: not a UTF-8 text label file; give a folder (root/<class>/<images>) "
            f"or a .csv/.parquet with path,label columns"
        ) from None


def _check_classes(data: LabelledImages, origin: Path) -> None:
    classes = sorted(set(data.labels))
    if not classes:
        raise ProbeDataError(f"{origin}: no images found")
    if len(classes) == 1:
        raise ProbeDataError(
            f"{origin}: only one class ({classes[0]!r}); a probe needs at least two"
        )


def stratified_split(
    labels: list[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: about `fraction` of each class held out, at least one where the
    class has two or more images."""
    if not 0 < fraction < 1:
        raise ProbeDataError(f"split fraction must be between 0 and 1, not {fraction}")
    rng = np.random.default_rng(seed)
    kept, held = [], []
    labels = np.asarray(labels)
    for label in sorted(set(labels.tolist())):
        index = rng.permutation(np.flatnonzero(labels == label))
        count = round(fraction * len(index))
        count = min(max(count, 1 if len(index) > 1 else 0), len(index) - 1)
        held.extend(index[:count])
        kept.extend(index[count:])
    return np.sort(np.array(kept, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def save_split(path: Path, splits: dict[str, LabelledImages], settings: dict) -> None:
    record = {
        **settings,
        **{
            name: [
                {"path": n, "label": lbl} for n, lbl in zip(data.names, data.labels, strict=True)
            ]
            for name, data in splits.items()
        },
    }
    write_json(path, record, indent=1)
