"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (idx files), for the benches that
try probes and pre-training on real labelled images: as arrays, or written out as an ImageFolder
tree that `aimv2 probe` reads. A bench helper, not part of the library."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


def available(folder: Path = DEBIAN_FOLDER) -> bool:
    return (folder / "train-images-idx3-ubyte.gz").is_file()


def read_split(split: str, folder: Path = DEBIAN_FOLDER) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of "train" (60 000) or "t10k" (10 000)."""
    images = _idx(folder / f"{split}-images-idx3-ubyte.gz")
    labels = _idx(folder / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_image_folder(
    images: np.ndarray, labels: np.ndarray, root: Path, prefix: str = ""
) -> Path:
    """PNG files under root/<class name>/, one per image."""
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / CLASSES[label] / f"{prefix}{i:05d}.png")
    return root
