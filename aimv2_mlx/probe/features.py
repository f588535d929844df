"""Frozen features for probes, computed once through the embed pipeline and cached on disk.

The cache key covers everything that changes a feature: the model (name, origin, revision and
a fingerprint of its weights), the preprocessing, what is extracted (pooled mean or patch
tokens, which blocks), the compute dtype, and the sorted file list with sizes and mtimes. Any
change is a new key, so a stale cache is never read. Images that fail to decode are excluded
and listed, never fatal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..data.pipeline import batches, map_in_order
from ..embed import image_decoder, model_identity
from ..errors import SettingError
from ..folders import atomic_write
from ..images import DEFAULT_MAX_MEGAPIXELS, check_megapixel_limit

TOKEN_CACHE_WARN_BYTES = 2 * 10**9


@dataclass
class Features:
    values: np.ndarray  # (N, D) pooled, or (N, T, D) tokens, for the images that decoded
    kept: np.ndarray  # indices into the input list of the rows of `values`
    failures: list[dict] = field(default_factory=list)  # {"path", "reason"}
    from_cache: bool = False


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aimv2-mlx" / "features"


def cache_key(paths: list[Path], model, kind: str, blocks: tuple[int, ...] | None) -> str:
    files = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        files.update(
            f"{os.fsdecode(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(
                "utf-8", "surrogateescape"
            )
        )
    config = model.config
    description = {
        "model": model_identity(model),
        "preprocess": dataclasses.asdict(config.preprocess),
        "kind": kind,
        "blocks": list(blocks) if blocks else None,
        "dtype": str(model.image_encoder.preprocessor.patchifier.proj.weight.dtype),
        "files": files.hexdigest(),
    }
    return hashlib.sha256(
        json.dumps(description, sort_keys=True, default=list).encode()
    ).hexdigest()[:24]


def features_for(
    paths: list[Path],
    model,
    kind: str = "mean",
    blocks: tuple[int, ...] | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    workers: int = 0,
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    progress=None,
) -> Features:
    """Pooled (`kind="mean"`) or token (`"tokens"`) features of `paths`, from the cache when it has
    them.

    A "mean" request is also served from a cached "tokens" entry (the mean over its tokens).
    `progress(done, total)` follows the images as they are encoded (not called for a cache hit).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    wanted = cache_dir / f"{cache_key(paths, model, kind, blocks)}.npz"
    cached = _read(wanted, len(paths))
    if cached is not None:
        return cached
    if kind == "mean":
        cached = _read(cache_dir / f"{cache_key(paths, model, 'tokens', blocks)}.npz", len(paths))
        if cached is not None and cached.values.ndim == 3:
            return Features(cached.values.mean(axis=1), cached.kept, cached.failures, True)
    features = extract(paths, model, kind, blocks, batch_size, workers, max_megapixels, progress)
    if kind == "tokens" and features.values.nbytes > TOKEN_CACHE_WARN_BYTES:
        print(
            f"warning: caching {features.values.nbytes / 1e9:.1f} GB of patch tokens in "
            f"{cache_dir}",
            file=sys.stderr,
        )
    _write(wanted, features)
    return features


def extract(
    paths: list[Path],
    model,
    kind: str = "mean",
    blocks: tuple[int, ...] | None = None,
    batch_size: int = 8,
    workers: int = 0,
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    progress=None,
) -> Features:
    """Run the encoder over `paths` (decoding on a thread pool ahead of it); `progress(done, total)`
    after each batch, failed images counted as done."""
    if kind not in ("mean", "tokens"):
        raise SettingError(f"unknown feature kind {kind!r}: use mean or tokens")
    check_megapixel_limit(max_megapixels)
    config = model.config
    if config.preprocess.mode == "native":
        if kind == "tokens":
            raise SettingError(
                "patch-token features need a fixed-resolution model (native token counts vary)"
            )
        batch_size = 1
    index = {id(p): i for i, p in enumerate(paths)}

    work = image_decoder(model, max_megapixels)
    rows, kept, failures = [], [], []
    for good, pixels, failed in batches(map_in_order(paths, work, workers), batch_size):
        failures.extend({"path": os.fsdecode(f.source), "reason": f.error} for f in failed)
        if good:
            features = model.image_features(mx.array(pixels), kind, blocks)
            rows.append(np.array(features[: len(good)].astype(mx.float32)))
            kept.extend(index[id(g.source)] for g in good)
        if progress:
            progress(len(kept) + len(failures), len(paths))
    dims = config.vision.hidden_size
    values = (
        np.concatenate(rows)
        if rows
        else np.zeros((0, dims) if kind == "mean" else (0, 0, dims), np.float32)
    )
    return Features(values, np.array(kept, dtype=np.int64), failures)


def _read(path: Path, count: int) -> Features | None:
    """A cache entry, or None when there is none or it is damaged (then it is recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            features = Features(
                data["values"], data["kept"], json.loads(str(data["failures"])), from_cache=True
            )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    kept = features.kept
    fits = (
        kept.ndim == 1
        and kept.dtype.kind == "i"
        and len(kept) == len(features.values) <= count
        and (len(kept) == 0 or (kept.min() >= 0 and kept.max() < count))
        and isinstance(features.failures, list)
    )
    return features if fits else None


def _write(path: Path, features: Features) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                values=features.values,
                kept=features.kept,
                failures=json.dumps(features.failures),
            )

    atomic_write(path, save)
