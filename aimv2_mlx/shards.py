"""Shard files of an embedding folder: atomic writes, done markers, and reading them back.

A shard is a contiguous block of rows. Its files are written under temporary names and renamed;
only then is `shard-NNNNN.done.json` written (also atomically), so a shard either has a marker
and complete files, or it is redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

from .errors import SettingError
from .folders import atomic_write

FORMATS = ("npy", "safetensors", "parquet")
METADATA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(
    folder: Path, index: int, vectors: np.ndarray, metadata: dict, fmt: str
) -> list[str]:
    """Write one shard's embeddings (.npy, .safetensors or inside the parquet) and metadata
    parquet.
    """
    name = shard_name(index)
    table = pa.table(metadata, schema=METADATA)
    files = []
    if fmt == "npy":

        def save_npy(tmp):
            with open(tmp, "wb") as fh:
                np.save(fh, vectors)

        atomic_write(folder / f"{name}.npy", save_npy)
        files.append(f"{name}.npy")
    elif fmt == "safetensors":
        atomic_write(
            folder / f"{name}.safetensors",
            lambda tmp: save_file({"embeddings": np.ascontiguousarray(vectors)}, str(tmp)),
        )
        files.append(f"{name}.safetensors")
    elif fmt == "parquet":
        width = int(np.prod(vectors.shape[1:])) if vectors.ndim > 1 else 1
        flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, width))
    else:
        raise SettingError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    atomic_write(folder / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp))
    return files + [f"{name}.parquet"]


def marker_path(folder: Path, index: int) -> Path:
    return folder / f"{shard_name(index)}.done.json"


def read_marker(folder: Path, index: int) -> dict | None:
    try:
        return json.loads(marker_path(folder, index).read_text())
    except (OSError, ValueError):
        return None


def read_shards(folder: str | os.PathLike) -> tuple[np.ndarray, pa.Table]:
    """All rows of a finished embedding folder: (vectors, metadata table), in row order."""
    folder = Path(folder).expanduser()
    manifest = json.loads((folder / "manifest.json").read_text())
    fmt, row_shape = manifest["format"], tuple(manifest["row_shape"] or ())
    vectors, tables = [], []
    for shard in manifest["shards"]:
        table = pq.read_table(folder / f"{shard['name']}.parquet")
        if fmt == "npy":
            vectors.append(np.load(folder / f"{shard['name']}.npy").reshape((-1,) + row_shape))
        elif fmt == "safetensors":
            vectors.append(
                load_file(folder / f"{shard['name']}.safetensors")["embeddings"].reshape(
                    (-1,) + row_shape
                )
            )
        else:
            flat = table.column("embedding").combine_chunks().flatten().to_numpy()
            vectors.append(flat.reshape((table.num_rows,) + row_shape))
            table = table.drop_columns(["embedding"])
        tables.append(table)
    return np.concatenate(vectors), pa.concat_tables(tables)
