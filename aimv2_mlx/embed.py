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
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import distributed
from .base import POOLS
from .data.pipeline import batches, decode_image, map_in_order, name_of
from .data.sources import discover
from .errors import SettingError
from .folders import TEMPORARY, atomic_write, is_empty, locked, write_json
from .images import DEFAULT_MAX_MEGAPIXELS, ImageError, ImageInput, check_megapixel_limit
from .model import load_default
from .shards import FORMATS, marker_path, read_marker, shard_name, write_shard
from .vectors import l2_normalize

DTYPES = ("float32", "float16")
# What a resumed run must share with the outputs already there.
SETTINGS = (
    "model",
    "preprocess",
    "max_megapixels",
    "pool",
    "normalize",
    "dtype",
    "format",
    "shard_size",
)
TOOL = "aimv2 embed"
# The only names an embedding folder's files have; nothing else there is ever deleted.
OWNED = re.compile(r"shard-\d{5}\.(npy|safetensors|parquet|done\.json)|failures\.jsonl")


def embed(
    images: Iterable[ImageInput],
    model=None,
    batch_size: int = 8,
    pool: str = "mean",
    normalize: bool = False,
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    workers: int = 0,
) -> np.ndarray:
    """Embed paths or PIL images; returns float32 (N, D) (or (N, T, D) for tokens).

    Images are decoded on `workers` threads while the model runs. An unusable image raises
    `ImageError` naming it. `model` defaults to `load_default()`.
    """
    if model is None:
        model = load_default()
    outputs = []
    for _good, vectors, failed in embed_batches(
        list(images),
        model,
        batch_size=batch_size,
        pool=pool,
        normalize=normalize,
        max_megapixels=max_megapixels,
        workers=workers,
    ):
        if failed:
            raise ImageError(f"{name_of(failed[0].source)}: {failed[0].error}")
        outputs.append(vectors)
    if not outputs:
        return np.zeros((0, model.config.vision.hidden_size), np.float32)
    return np.concatenate(outputs)


def image_decoder(model, max_megapixels: float | None):
    """source -> the model's preprocessed pixels (its resize, crop and normalisation)."""
    config = model.config
    return partial(
        decode_image,
        config=config.preprocess,
        patch_size=config.vision.patch_size,
        max_megapixels=max_megapixels,
    )


def embed_batches(
    sources: Iterable,
    model,
    *,
    batch_size: int = 8,
    pool: str = "mean",
    normalize: bool = False,
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    workers: int = 0,
):
    """Yield (good, vectors, failed) per batch: the decoding, batching and pooling of `embed`,
    for callers (the search index) that keep their own per-file records. Failures are yielded,
    never raised; `vectors` is float32 with one row per `good` entry."""
    _check_choice("pool", pool, POOLS)
    check_megapixel_limit(max_megapixels)
    stream = map_in_order(sources, image_decoder(model, max_megapixels), workers)
    with contextlib.closing(stream):
        for good, pixels, failed in batches(stream, _batch_size(model, batch_size)):
            vectors = _vectors(model, pixels, pool, normalize)[: len(good)] if good else None
            yield good, vectors, failed


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


def embed_folder(
    inputs,
    output: str | os.PathLike,
    model,
    *,
    batch_size: int = 8,
    shard_size: int = 1000,
    pool: str = "mean",
    normalize: bool = False,
    dtype: str = "float32",
    format: str = "npy",
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    workers: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> EmbedSummary:
    """Embed every image of `inputs` (folders, file lists, WebDataset tars) into `output`.

    Writes `shard-NNNNN.{npy|safetensors}` + `shard-NNNNN.parquet` (metadata: path, size,
    mtime, width, height; with format "parquet" the embeddings too), `failures.jsonl` and
    `manifest.json`. Rows follow the sorted relative paths. A second call with the same
    settings reuses finished shards; different settings raise `FileExistsError` unless
    `overwrite`, which deletes only the files the manifest lists. A non-empty folder that an
    earlier `embed_folder` did not make is refused, and the folder is locked while the run
    writes (`FolderInUseError` names the holder's PID). `progress(done, total, failed)` is
    called after every batch.
    """
    start = time.perf_counter()
    _check_choice("pool", pool, POOLS)
    _check_choice("format", format, FORMATS)
    _check_choice("dtype", dtype, DTYPES)
    check_megapixel_limit(max_megapixels)
    if shard_size < 1 or batch_size < 1:
        raise SettingError("--shard-size and --batch-size must be at least 1")
    if pool == "tokens" and model.config.preprocess.mode == "native":
        raise SettingError(
            "--pool tokens needs a fixed-resolution model: native-resolution token counts vary"
        )
    if pool == "head" and not (model.config.vision.use_head or model.config.is_lit):
        raise SettingError(
            f"{model.config.name} has no attention-pooling head: use --pool mean or tokens"
        )
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    items = discover(inputs)
    if not items:
        raise FileNotFoundError(f"{', '.join(map(os.fsdecode, inputs))}: no images found")
    output = Path(output).expanduser()
    config = model.config
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
    shards = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    _check_ours(output, items)  # every rank, so all fail alike before waiting
    if not overwrite:
        _check_compatible(output, settings)
    with locked(output) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            _check_ours(output, items)  # again, now that no other run can change the folder
            _prepare(output, settings, _planned(len(shards), format), overwrite)
        distributed.barrier(world)

        fingerprints = [_fingerprint(shard) for shard in shards]
        mine = distributed.my_range(len(shards), rank, size)
        todo = [i for i in mine if (read_marker(output, i) or {}).get("inputs") != fingerprints[i]]
        _embed_shards(
            model,
            output,
            shards,
            todo,
            fingerprints,
            batch_size=_batch_size(model, batch_size),
            pool=pool,
            normalize=normalize,
            dtype=dtype,
            fmt=format,
            max_megapixels=max_megapixels,
            workers=workers,
            progress=progress,
        )
        distributed.barrier(world)
        if rank == 0:
            _finish(output, settings, shards, _batch_size(model, batch_size), _compute_dtype(model))
        distributed.barrier(world)
    manifest = json.loads((output / "manifest.json").read_text())
    return EmbedSummary(
        output=str(output),
        model=config.name,
        images=len(items),
        embedded=manifest["counts"]["embedded"],
        failed=manifest["counts"]["failed"],
        shards=len(shards),
        shards_reused=len(mine) - len(todo),
        processed=sum(len(shards[i]) for i in todo),
        seconds=time.perf_counter() - start,
    )


def _embed_shards(
    model,
    output: Path,
    shards: list,
    todo: list,
    fingerprints: list,
    *,
    batch_size: int,
    pool: str,
    normalize: bool,
    dtype: str,
    fmt: str,
    max_megapixels,
    workers: int,
    progress,
) -> None:
    """Embed and write the shards in `todo`, decoding ahead across shard boundaries."""
    work = image_decoder(model, max_megapixels)
    stream = map_in_order((item for i in todo for item in shards[i]), work, workers)
    total = sum(len(shards[i]) for i in todo)
    done = failed_so_far = 0
    with contextlib.closing(stream):
        for index in todo:
            vectors, rows, failures = [], [], []
            for good, pixels, failed in batches(
                itertools.islice(stream, len(shards[index])), batch_size
            ):
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
    out = model.image_features(mx.array(pixels), pool).astype(mx.float32)
    if normalize:
        out = l2_normalize(out)
    return np.array(out)


def _write_shard(
    output: Path,
    index: int,
    vectors: list,
    rows: list,
    failures: list,
    fingerprint: str,
    dtype: str,
    fmt: str,
) -> None:
    array = np.concatenate(vectors).astype(dtype) if vectors else np.zeros((0,), dtype)
    metadata = {
        "path": [r.source.key for r in rows],
        "size": np.array([r.source.size for r in rows], np.int64),
        "mtime": np.array([r.source.mtime for r in rows], np.float64),
        "width": np.array([r.width for r in rows], np.int32),
        "height": np.array([r.height for r in rows], np.int32),
    }
    files = write_shard(output, index, array, metadata, fmt)
    write_json(
        marker_path(output, index),
        {
            "shard": shard_name(index),
            "rows": len(rows),
            "row_shape": list(array.shape[1:]) if vectors else None,
            "files": files,
            "inputs": fingerprint,
            "failures": failures,
        },
    )


def _planned(count: int, fmt: str) -> list[str]:
    """Every file name a run of `count` shards in `fmt` writes (besides manifest.json)."""
    suffixes = (".parquet", ".done.json") + (() if fmt == "parquet" else (f".{fmt}",))
    return [shard_name(i) + suffix for i in range(count) for suffix in suffixes] + [
        "failures.jsonl"
    ]


def _owned(output: Path) -> set[str]:
    """The files an earlier run recorded as its own: the manifest's list and every done marker's."""
    names = set()
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        names.update(json.loads((output / "manifest.json").read_text()).get("files") or [])
    for marker in output.glob("shard-*.done.json"):
        names.add(marker.name)
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            names.update(json.loads(marker.read_text()).get("files") or [])
    return {name for name in names if isinstance(name, str) and OWNED.fullmatch(name)}


def _prepare(output: Path, settings: dict, planned: list[str], overwrite: bool) -> None:
    """Record the settings and every file this run will write in the manifest before writing any;
    with `overwrite`, first delete the files earlier runs recorded (only those); drop a killed
    run's temporary files (ours by name: the folder is locked)."""
    owned = _owned(output)
    for path in output.iterdir():
        temporary = TEMPORARY.fullmatch(path.name)
        if (
            temporary
            and (OWNED.fullmatch(temporary["name"]) or temporary["name"] == "manifest.json")
        ) or (overwrite and path.name in owned):
            path.unlink()
    manifest = output / "manifest.json"
    if overwrite or not manifest.exists():
        write_json(
            manifest,
            {
                "format_version": 1,
                "tool": TOOL,
                "complete": False,
                **settings,
                "files": sorted(planned),
            },
        )
    else:
        existing = json.loads(manifest.read_text())
        existing["files"] = sorted(owned | set(planned))
        write_json(manifest, existing)


def _check_ours(output: Path, items: list) -> None:
    """Write only into a new or empty folder, or one an earlier `aimv2 embed` made."""
    if is_empty(output):
        return
    try:
        manifest = json.loads((output / "manifest.json").read_text())
        ours = isinstance(manifest, dict) and all(
            key in manifest for key in ("format_version", *SETTINGS)
        )
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise FileExistsError(
            f"{output}: not empty and not an aimv2 embed output folder (no manifest.json of "
            "ours); choose a new or empty output folder"
        )
    owned, here = _owned(output) | {"manifest.json"}, output.resolve()
    inside = sorted(
        item.key
        for item in items
        if os.path.basename(item.path) in owned and Path(item.path).parent.resolve() == here
    )
    if inside:
        raise FileExistsError(
            f"{output}: input {inside[0]} has the name of one of this folder's outputs; "
            "choose another output folder"
        )


def _check_compatible(output: Path, settings: dict) -> None:
    try:
        existing = json.loads((output / "manifest.json").read_text())
    except FileNotFoundError:
        return
    changed = [
        key
        for key in SETTINGS
        if _comparable(key, existing.get(key)) != _comparable(key, settings[key])
    ]
    if changed:
        raise FileExistsError(
            f"{output}: holds embeddings made with a different {', '.join(changed)}; "
            "use --overwrite to replace them or choose another output folder"
        )


def _comparable(key: str, value):
    """Settings as compared on resume: a model is its name and weights, wherever it was loaded
    from.
    """
    if key == "model" and isinstance(value, dict):
        return value.get("name"), value.get("weights_sha256")
    return value


def _finish(
    output: Path, settings: dict, shards: list, batch_size: int, compute_dtype: str
) -> None:
    """Gather every shard's marker into failures.jsonl and the final manifest."""
    markers = [read_marker(output, i) for i in range(len(shards))]
    missing = [shard_name(i) for i, m in enumerate(markers) if m is None]
    if missing:
        raise RuntimeError(f"{output}: {missing[0]} was not written by any process")
    failures = [f for m in markers for f in m["failures"]]
    lines = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    atomic_write(output / "failures.jsonl", lambda tmp: tmp.write_text(lines))
    for stale in output.glob("shard-*.done.json"):  # shards past the end of a shrunk input
        index = int(stale.name[6:11]) if OWNED.fullmatch(stale.name) else -1
        if index >= len(shards):
            files = (read_marker(output, index) or {}).get("files") or []
            for name in [
                n
                for n in files
                if isinstance(n, str)
                and n.startswith(shard_name(index) + ".")
                and OWNED.fullmatch(n)
            ] + [stale.name]:
                (output / name).unlink(missing_ok=True)
    row_shape = next((m["row_shape"] for m in markers if m["row_shape"]), None)
    previous = json.loads((output / "manifest.json").read_text())
    write_json(
        output / "manifest.json",
        {
            "format_version": 1,
            "tool": TOOL,
            "complete": True,
            **settings,
            "compute_dtype": compute_dtype,
            "batch_size": batch_size,
            "row_shape": row_shape,
            "counts": {
                "images": sum(map(len, shards)),
                "embedded": sum(m["rows"] for m in markers),
                "failed": len(failures),
                "shards": len(shards),
            },
            "shards": [
                {"name": m["shard"], "rows": m["rows"], "files": m["files"]} for m in markers
            ],
            "files": previous.get("files") or [],
        },
    )


def model_identity(model) -> dict:
    """Name, origin and a fingerprint of the weights (their first values), to refuse mixing
    models.
    """
    config = model.config
    digest = hashlib.sha256()
    for key, value in sorted(tree_flatten(model.parameters())):
        head = np.array(value.reshape(-1)[:1024].astype(mx.float32))
        digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode() + head.tobytes())
    return {
        "name": config.name,
        "origin": config.source.get("origin"),
        "revision": config.source.get("revision"),
        "weights_sha256": digest.hexdigest()[:16],
    }


def same_model(identity: dict, recorded: dict) -> bool:
    """Whether two `model_identity` records name the same model: name and weights, wherever it
    was loaded from."""
    return (identity["name"], identity["weights_sha256"]) == (
        recorded.get("name"),
        recorded.get("weights_sha256"),
    )


def _fingerprint(shard: list) -> str:
    """What a shard was made from: keys, sizes and mtimes of its inputs."""
    text = "".join(f"{item.key}\0{item.size}\0{item.mtime!r}\n" for item in shard)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _compute_dtype(model) -> str:
    return str(next(v.dtype for _, v in tree_flatten(model.parameters()))).replace("mlx.core.", "")


def _batch_size(model, batch_size: int) -> int:
    return 1 if model.config.preprocess.mode == "native" else batch_size


def _check_choice(what: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise SettingError(f"unknown {what} {value!r}: use {', '.join(choices)}")
