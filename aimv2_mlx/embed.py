"""Images to vectors: `embed()` for notebooks and `embed_folder()`, the run behind `aimv2 embed`.

`embed_folder` writes contiguous shards of the sorted input (see `shards`), skips shards that a
previous run of the same settings finished, lists unusable files in `failures.jsonl` instead of
stopping, and splits the shards over processes started by `mlx.launch`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import distributed
from .data.pipeline import batches, decode, decoded, name_of
from .data.sources import discover
from .images import DEFAULT_MAX_MEGAPIXELS, ImageError, ImageInput
from .shards import FORMATS, atomic_write, marker_path, read_marker, shard_name, write_json, write_shard

POOLS = ("mean", "tokens", "head")
DTYPES = ("float32", "float16")
# What a resumed run must share with the outputs already there.
SETTINGS = ("model", "preprocess", "max_megapixels", "pool", "normalize", "dtype", "format", "shard_size")


def embed(images: Iterable[ImageInput], model=None, batch_size: int = 8, pool: str = "mean",
          normalize: bool = False, max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
          workers: int = 0) -> np.ndarray:
    """Embed paths or PIL images; returns float32 (N, D) (or (N, T, D) for tokens).

    Images are decoded on `workers` threads while the model runs. An unusable image raises
    `ImageError` naming it. `model` defaults to `load_default()`.
    """
    if model is None:
        from .model import load_default

        model = load_default()
    _check_choice("pool", pool, POOLS)
    batch_size = _batch_size(model, batch_size)
    work = partial(decode, config=model.model_config.preprocess,
                   patch_size=model.model_config.vision.patch_size, max_megapixels=max_megapixels)
    outputs = []
    for good, pixels, failed in batches(decoded(list(images), work, workers), batch_size):
        if failed:
            raise ImageError(f"{name_of(failed[0].source)}: {failed[0].error}")
        outputs.append(_vectors(model, pixels, pool, normalize)[: len(good)])
    if not outputs:
        return np.zeros((0, model.model_config.vision.hidden_size), np.float32)
    return np.concatenate(outputs)


@dataclass
class EmbedSummary:
    """What a run did; `aimv2 embed --json` prints it."""

    output: str
    model: str
    images: int  # inputs found
    embedded: int  # rows written (all shards)
    failed: int  # inputs listed in failures.jsonl
    shards: int
    shards_reused: int  # finished by an earlier run and not recomputed
    processed: int  # inputs this process decoded in this run
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 3)}


def embed_folder(inputs, output: str | os.PathLike, model, *, batch_size: int = 8, shard_size: int = 1000,
                 pool: str = "mean", normalize: bool = False, dtype: str = "float32", format: str = "npy",
                 max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS, workers: int = 0,
                 overwrite: bool = False,
                 progress: Callable[[int, int, int], None] | None = None) -> EmbedSummary:
    """Embed every image of `inputs` (folders, file lists, WebDataset tars) into `output`.

    Writes `shard-NNNNN.{npy|safetensors}` + `shard-NNNNN.parquet` (metadata: path, size,
    mtime, width, height; with format "parquet" the embeddings too), `failures.jsonl` and
    `manifest.json`. Rows follow the sorted relative paths. A second call with the same
    settings reuses finished shards; different settings raise `FileExistsError` unless
    `overwrite`. `progress(done, total, failed)` is called after every batch.
    """
    start = time.perf_counter()
    _check_choice("pool", pool, POOLS)
    _check_choice("format", format, FORMATS)
    _check_choice("dtype", dtype, DTYPES)
    if shard_size < 1 or batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be at least 1")
    if pool == "tokens" and model.model_config.preprocess.mode == "native":
        raise ValueError("--pool tokens needs a fixed-resolution model: native-resolution token counts vary")
    if pool == "head" and not (model.model_config.vision.use_head or model.model_config.is_lit):
        raise ValueError(f"{model.model_config.name} has no attention-pooling head: use --pool mean or tokens")
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    items = discover(inputs)
    if not items:
        raise FileNotFoundError(f"{', '.join(map(os.fsdecode, inputs))}: no images found")
    output = Path(output).expanduser()
    config = model.model_config
    settings = {
        "model": model_identity(model),
        "preprocess": asdict(config.preprocess),
        "max_megapixels": max_megapixels,
        "pool": pool,
        "normalize": normalize,
        "dtype": dtype,
        "format": format,
        "shard_size": shard_size,
    }
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back from JSON
    world = distributed.group()
    rank, size = distributed.rank_and_size(world)
    if not overwrite:
        _check_compatible(output, settings)  # every rank, so all fail alike before waiting
    if rank == 0:
        _prepare(output, settings, overwrite)
    distributed.barrier(world)

    shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    fingerprints = [_fingerprint(shard) for shard in shards]
    mine = distributed.my_range(len(shards), rank, size)
    todo = [i for i in mine if (read_marker(output, i) or {}).get("inputs") != fingerprints[i]]
    _embed_shards(model, output, shards, todo, fingerprints, batch_size=_batch_size(model, batch_size), pool=pool,
                  normalize=normalize, dtype=dtype, fmt=format, max_megapixels=max_megapixels, workers=workers,
                  progress=progress)
    distributed.barrier(world)
    if rank == 0:
        _finish(output, settings, shards, _batch_size(model, batch_size), _compute_dtype(model))
    distributed.barrier(world)
    manifest = json.loads((output / "manifest.json").read_text())
    return EmbedSummary(
        output=str(output), model=config.name, images=len(items), embedded=manifest["counts"]["embedded"],
        failed=manifest["counts"]["failed"], shards=len(shards), shards_reused=len(mine) - len(todo),
        processed=sum(len(shards[i]) for i in todo), seconds=time.perf_counter() - start,
    )


def _embed_shards(model, output: Path, shards: list, todo: list, fingerprints: list, *, batch_size: int,
                  pool: str, normalize: bool, dtype: str, fmt: str, max_megapixels, workers: int, progress) -> None:
    """Embed and write the shards in `todo`, decoding ahead across shard boundaries."""
    config = model.model_config
    work = partial(decode, config=config.preprocess, patch_size=config.vision.patch_size,
                   max_megapixels=max_megapixels)
    stream = decoded((item for i in todo for item in shards[i]), work, workers)
    total = sum(len(shards[i]) for i in todo)
    done = failed_so_far = 0
    with contextlib.closing(stream):
        for index in todo:
            vectors, rows, failures = [], [], []
            for good, pixels, failed in batches(itertools.islice(stream, len(shards[index])), batch_size):
                failures += [{"path": r.source.key, "reason": r.error} for r in failed]
                if good:
                    vectors.append(_vectors(model, pixels, pool, normalize)[: len(good)])
                    rows += good
                done += len(good) + len(failed)
                failed_so_far += len(failed)
                if progress:
                    progress(done, total, failed_so_far)
            _write_shard(output, index, vectors, rows, failures, fingerprints[index], dtype, fmt)


def _vectors(model, pixels: np.ndarray, pool: str, normalize: bool) -> np.ndarray:
    x = mx.array(pixels)
    if pool == "mean":
        out = model(x).mean(axis=1)
    elif pool == "tokens":
        out = model(x)
    else:  # the attention-pool head; for LiT the projected image embedding (its zero-shot space)
        out = model.encode_image(x) if hasattr(model, "encode_image") else model.pool(x)
    out = out.astype(mx.float32)
    if normalize:
        out = out / mx.linalg.norm(out, axis=-1, keepdims=True)
    return np.array(out)


def _write_shard(output: Path, index: int, vectors: list, rows: list, failures: list, fingerprint: str,
                 dtype: str, fmt: str) -> None:
    array = np.concatenate(vectors).astype(dtype) if vectors else np.zeros((0,), dtype)
    metadata = {
        "path": [r.source.key for r in rows],
        "size": np.array([r.source.size for r in rows], np.int64),
        "mtime": np.array([r.source.mtime for r in rows], np.float64),
        "width": np.array([r.width for r in rows], np.int32),
        "height": np.array([r.height for r in rows], np.int32),
    }
    files = write_shard(output, index, array, metadata, fmt)
    write_json(marker_path(output, index), {
        "shard": shard_name(index), "rows": len(rows), "row_shape": list(array.shape[1:]) if vectors else None,
        "files": files, "inputs": fingerprint, "failures": failures,
    })


def _prepare(output: Path, settings: dict, overwrite: bool) -> None:
    """Create the folder (cleared of our files with `overwrite`), drop a killed run's temporary
    files, and record the settings first."""
    output.mkdir(parents=True, exist_ok=True)
    for path in output.iterdir():
        ours = path.name.startswith("shard-") or path.name in ("manifest.json", "failures.jsonl")
        if (path.name.startswith(".") and ".tmp-" in path.name) or (overwrite and ours):
            path.unlink()  # temporary files of a killed run, or everything when overwriting
    if not (output / "manifest.json").exists():
        write_json(output / "manifest.json", {"format_version": 1, "complete": False, **settings})


def _check_compatible(output: Path, settings: dict) -> None:
    try:
        existing = json.loads((output / "manifest.json").read_text())
    except FileNotFoundError:
        if output.is_dir() and any(output.glob("shard-*")):
            raise FileExistsError(f"{output}: holds shards but no manifest.json; use --overwrite to replace them") from None
        return
    except ValueError:
        raise FileExistsError(f"{output}/manifest.json: unreadable; use --overwrite to start again") from None
    changed = [key for key in SETTINGS if _comparable(key, existing.get(key)) != _comparable(key, settings[key])]
    if changed:
        raise FileExistsError(
            f"{output}: holds embeddings made with a different {', '.join(changed)}; "
            "use --overwrite to replace them or choose another output folder"
        )


def _comparable(key: str, value):
    """Settings as compared on resume: a model is its name and weights, wherever it was loaded from."""
    if key == "model" and isinstance(value, dict):
        return value.get("name"), value.get("weights_sha256")
    return value


def _finish(output: Path, settings: dict, shards: list, batch_size: int, compute_dtype: str) -> None:
    """Gather every shard's marker into failures.jsonl and the final manifest."""
    markers = [read_marker(output, i) for i in range(len(shards))]
    missing = [shard_name(i) for i, m in enumerate(markers) if m is None]
    if missing:
        raise RuntimeError(f"{output}: {missing[0]} was not written by any process")
    failures = [f for m in markers for f in m["failures"]]
    lines = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    atomic_write(output / "failures.jsonl", lambda tmp: tmp.write_text(lines))
    for stale in output.glob("shard-*.done.json"):  # shards past the end of a shrunk input
        index = int(stale.name.split(".")[0].split("-")[1])
        if index >= len(shards):
            for name in read_marker(output, index)["files"] + [stale.name]:
                (output / name).unlink(missing_ok=True)
    row_shape = next((m["row_shape"] for m in markers if m["row_shape"]), None)
    write_json(output / "manifest.json", {
        "format_version": 1,
        "complete": True,
        **settings,
        "compute_dtype": compute_dtype,
        "batch_size": batch_size,
        "row_shape": row_shape,
        "counts": {"images": sum(map(len, shards)), "embedded": sum(m["rows"] for m in markers),
                   "failed": len(failures), "shards": len(shards)},
        "shards": [{"name": m["shard"], "rows": m["rows"], "files": m["files"]} for m in markers],
    })


def model_identity(model) -> dict:
    """Name, origin and a fingerprint of the weights (their first values), to refuse mixing models."""
    config = model.model_config
    digest = hashlib.sha256()
    for key, value in sorted(tree_flatten(model.parameters())):
        head = np.array(value.reshape(-1)[:1024].astype(mx.float32))
        digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode() + head.tobytes())
    return {"name": config.name, "origin": config.source.get("origin"), "revision": config.source.get("revision"),
            "weights_sha256": digest.hexdigest()[:16]}


def _fingerprint(shard: list) -> str:
    """What a shard was made from: keys, sizes and mtimes of its inputs."""
    text = "".join(f"{item.key}\0{item.size}\0{item.mtime!r}\n" for item in shard)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _compute_dtype(model) -> str:
    return str(next(v.dtype for _, v in tree_flatten(model.parameters()))).replace("mlx.core.", "")


def _batch_size(model, batch_size: int) -> int:
    return 1 if model.model_config.preprocess.mode == "native" else batch_size


def _check_choice(what: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: use {', '.join(choices)}")

