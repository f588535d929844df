"""Open a checkpoint (folder or file) as lazy tensors: names, shapes and dtypes at once, values
only when asked for.

Containers: safetensors (single, or sharded with `model.safetensors.index.json`) and PyTorch zip
pickles (`.pth`, `.pt`, `.bin`, read by the restricted torch-free reader). A file given directly
is recognised by its content, not its name. Every file is checked when opened (header against
size, index entries inside the folder), so damage is reported before any work is done.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import mlx.core as mx
import numpy as np

from .l3m import is_dcp_folder, open_training_checkpoint, refuse_dcp_folder
from .safetensors_io import read_header, read_tensor
from .weights import PICKLE_PATTERNS, CheckpointError

INDEX = "model.safetensors.index.json"


@dataclass
class TensorRef:
    """One tensor of a checkpoint; `load()` reads it."""

    shape: tuple[int, ...]
    dtype: str
    file: Path
    read: Callable[[], np.ndarray]

    def load(self) -> mx.array:
        values = mx.array(self.read())
        return values.view(mx.bfloat16) if self.dtype == "bfloat16" else values


@dataclass
class Checkpoint:
    folder: Path  # where config.json / preprocessor_config.json / tokenizer files may sit
    path: Path  # the file (or index) the tensors come from, for messages
    tensors: dict[str, TensorRef]


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    if path.is_file():
        return Checkpoint(path.parent, path, _open_file(path))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    if is_dcp_folder(path):
        refuse_dcp_folder(path)
    index = path / INDEX
    if index.exists():
        return Checkpoint(path, index, _open_index(index))
    for name in ("model.safetensors", "mlx_model.safetensors"):
        if (path / name).exists():
            return Checkpoint(path, path / name, _open_safetensors(path / name))
    candidates = sorted(path.glob("*.safetensors"))
    if not candidates:
        candidates = sorted(p for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    if len(candidates) == 1:
        return Checkpoint(path, candidates[0], _open_file(candidates[0]))
    found = f"found {', '.join(p.name for p in candidates)}" if candidates else "found none"
    raise CheckpointError(
        f"{path}: expected one model.safetensors, a sharded {INDEX} or one PyTorch checkpoint "
        f"({found})"
    )


def _open_file(path: Path) -> dict[str, TensorRef]:
    if zipfile.is_zipfile(path):
        return _open_pickle(path)
    with open(path, "rb") as handle:
        start = handle.read(9)
    # huggingface/safetensors format: an 8-byte length, then a JSON header that begins with {
    if start[8:] != b"{":
        raise CheckpointError(
            f"{path}: not a checkpoint: give a .safetensors file, a PyTorch .bin/.pth/.pt "
            f"(zip) file, or a folder holding one"
        )
    return _open_safetensors(path)


def _open_safetensors(path: Path) -> dict[str, TensorRef]:
    return {
        key: TensorRef(
            entry.shape, entry.dtype, path, lambda path=path, entry=entry: read_tensor(path, entry)
        )
        for key, entry in read_header(path).items()
    }


def _open_pickle(path: Path) -> dict[str, TensorRef]:
    """The state dict's tensors (a training file's `"model"` part; its other entries unused)."""
    model = open_training_checkpoint(path).model
    return {key: TensorRef(t.shape, t.dtype, path, t.numpy) for key, t in model.items()}


def _open_index(index: Path) -> dict[str, TensorRef]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index}: not a safetensors index ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: not a safetensors index (weight_map is not names to shard files)"
        )
    shards: dict[str, dict[str, TensorRef]] = {}
    tensors = {}
    for key, shard in weight_map.items():
        if shard not in shards:
            shards[shard] = _open_safetensors(_shard_path(index, shard))
        if key not in shards[shard]:
            raise CheckpointError(f"{index}: tensor {key!r} is not in its shard {shard!r}")
        tensors[key] = shards[shard][key]
    return tensors


def _shard_path(index: Path, shard: str) -> Path:
    """The shard's file next to the index, judged by its name alone.

    The name, not its resolved target, is checked: in the Hugging Face cache every file of a
    snapshot is a symlink into the repo's `blobs/` folder, outside the snapshot's own.
    """
    name = PurePosixPath(shard)
    escapes = name.is_absolute() or ".." in name.parts or PureWindowsPath(shard).drive
    if not shard or escapes or "\\" in shard or "\0" in shard:
        raise CheckpointError(f"{index}: shard {shard!r} points outside its folder")
    path = index.parent / name
    if not path.is_file():
        raise CheckpointError(f"{index}: shard {shard!r} is missing")
    return path
