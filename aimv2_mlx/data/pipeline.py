"""Decode images on a thread pool, in order, ahead of the model, into fixed-shape batches.

Pillow and NumPy release the GIL while they decode, resize and normalise, and so does MLX while
it evaluates, so threads are enough to keep decoding off the encoder's critical path. Batches
always have the same shape (the last one is padded) so compiled graphs are reused.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..config import PreprocessConfig
from ..images import DEFAULT_MAX_MEGAPIXELS, ImageError, open_image, to_pixels
from .sources import Item, display


@dataclass
class DecodedImage:
    """One input after decoding: pixels and the upright size, or the reason it failed."""

    source: object  # an Item, a path or a PIL image
    pixels: np.ndarray | None = None
    width: int = 0
    height: int = 0
    error: str | None = None


def name_of(source) -> str:
    if isinstance(source, Item):
        return source.key
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return os.fsdecode(source)


def decode_image(
    source,
    config: PreprocessConfig,
    patch_size: int,
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
) -> DecodedImage:
    """Decode and preprocess one input; any failure is returned as a reason, never raised."""
    name = name_of(source)
    try:
        if isinstance(source, Item):
            with source.open() as fh:
                image = open_image(fh, max_megapixels, name=name)
        else:
            image = open_image(source, max_megapixels, name=name)
        return DecodedImage(source, to_pixels(image, config, patch_size), image.width, image.height)
    except ImageError as exc:
        reason = str(exc)
        reason = reason[len(name) + 2 :] if reason.startswith(name + ": ") else reason
    except OSError as exc:  # missing, or not a regular file
        reason = f"cannot read ({exc.strerror or exc})"
    except Exception as exc:  # a broken file must never stop a run
        reason = f"{type(exc).__name__}: {exc}"
    return DecodedImage(source, error=display(reason))  # reasons may quote undecodable file names


def map_in_order(
    sources: Iterable, work: Callable[[object], DecodedImage], workers: int = 0, ahead: int = 32
) -> Iterator[DecodedImage]:
    """`work(source)` for every source, on `workers` threads, yielded in input order.

    At most `ahead` results are in flight, so memory stays bounded on any folder size.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="aimv2-decode")
    pending = collections.deque()
    sources = iter(sources)
    try:
        for source in sources:
            pending.append(pool.submit(work, source))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            for source in sources:
                pending.append(pool.submit(work, source))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batches(
    results: Iterable[DecodedImage], batch_size: int
) -> Iterator[tuple[list[DecodedImage], np.ndarray | None, list[DecodedImage]]]:
    """Group decoded inputs into (good, pixels, failed); `pixels` is padded to `batch_size` rows.

    All good images must share one shape (native-resolution models use batches of one). The
    last group may have no good images (pixels None) and carries the trailing failures.
    """
    good, failed = [], []
    for result in results:
        if result.error is not None:
            failed.append(result)
            continue
        good.append(result)
        if len(good) == batch_size:
            yield good, _padded(good, batch_size), failed
            good, failed = [], []
    if good or failed:
        yield good, _padded(good, batch_size) if good else None, failed


def _padded(good: list[DecodedImage], batch_size: int) -> np.ndarray:
    pixels = np.empty((batch_size,) + good[0].pixels.shape, np.float32)
    for i, result in enumerate(good):
        pixels[i] = result.pixels
    pixels[len(good) :] = 0.0
    return pixels
