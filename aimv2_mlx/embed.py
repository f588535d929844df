"""Images to vectors: the Python API behind `aimv2 embed`.

This first version embeds in fixed-size batches and writes one `.npy` with a manifest; the
resumable, sharded, parallel pipeline builds on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import mlx.core as mx
import numpy as np

from .images import ImageInput, image_files, open_image, to_pixels


def embed(images: Iterable[ImageInput], model, batch_size: int = 8, pool: str = "mean",
          normalize: bool = False) -> np.ndarray:
    """Embed paths or PIL images with `model`; returns float32 (N, D) (or (N, T, D) for tokens)."""
    config = model.model_config.preprocess
    patch = model.model_config.vision.patch_size
    images = list(images)
    if config.mode == "native":  # every image keeps its own shape: batches of one
        batch_size = 1
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = np.stack([to_pixels(open_image(img), config, patch) for img in chunk])
        if len(chunk) < batch_size:
            pixels = np.concatenate([pixels, np.zeros((batch_size - len(chunk),) + pixels.shape[1:], np.float32)])
        vectors = _pool(model, mx.array(pixels), pool)[: len(chunk)]
        if normalize:
            vectors = vectors / mx.linalg.norm(vectors, axis=-1, keepdims=True)
        outputs.append(np.array(vectors.astype(mx.float32)))
    return np.concatenate(outputs) if outputs else np.zeros((0, model.model_config.vision.hidden_size), np.float32)


def _pool(model, pixels: mx.array, pool: str) -> mx.array:
    if pool == "mean":
        return model(pixels).mean(axis=1)
    if pool == "tokens":
        return model(pixels)
    if pool == "head":
        encoder = model.image_encoder if hasattr(model, "image_encoder") else model
        return encoder.pool(pixels)
    raise ValueError(f"unknown pooling {pool!r}: use mean, tokens or head")


def embed_folder(folder: str | os.PathLike, output: str | os.PathLike, model, batch_size: int = 8,
                 pool: str = "mean", normalize: bool = False) -> Path:
    """Embed every image under `folder`; writes embeddings.npy, paths.txt and manifest.json."""
    folder, output = Path(folder), Path(output)
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no images found")
    vectors = embed(files, model, batch_size=batch_size, pool=pool, normalize=normalize)
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / "embeddings.npy.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, vectors)
    os.replace(tmp, output / "embeddings.npy")
    (output / "paths.txt").write_text("".join(f"{p.relative_to(folder).as_posix()}\n" for p in files))
    config = model.model_config
    manifest = {
        "model": config.name,
        "source": config.source,
        "preprocess": config.preprocess.__dict__,
        "pool": pool,
        "normalize": normalize,
        "dtype": "float32",
        "count": len(files),
        "dim": int(vectors.shape[-1]),
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2, default=list) + "\n")
    return output / "embeddings.npy"
