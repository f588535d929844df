"""Training augmentation: RandomResizedCrop (scale 0.4–1, bicubic) + horizontal flip, then
mean/std normalisation (ImageNet by default), as apple/ml-l3m's configs/aimv2/001_aimv2_hfdata.yaml.
Randomness comes from the caller's generator, so a sample's crop depends only on how the caller
seeds it (here: seed, epoch, index).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..config import IMAGENET_MEAN, IMAGENET_STD


def random_resized_crop_box(
    rng: np.random.Generator, width: int, height: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's RandomResizedCrop picks it (10 tries, then centre)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def augment(
    image: Image.Image, size: int, rng: np.random.Generator, scale=(0.4, 1.0)
) -> Image.Image:
    left, top, w, h = random_resized_crop_box(rng, image.width, image.height, scale)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if rng.uniform() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def normalize(image: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """RGB image -> float32 (H, W, 3), (x/255 − mean) / std."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) * np.float32(1 / 255)
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
