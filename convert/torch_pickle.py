"""Read PyTorch zip checkpoints (`.pth`, `.pt`, `.bin`) without torch and without running code.

A torch checkpoint is a zip holding `data.pkl` plus one raw file per storage. The pickle is
read by an unpickler that resolves only the globals needed to rebuild tensors and plain
containers; any other global (`os.system`, `builtins.eval`, …) is refused before it can be
called, with an error naming it. Storages are read straight from the zip into NumPy.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from aimv2_mlx.weights import CheckpointError

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A storage's raw bytes viewed as its dtype (bfloat16 kept as uint16 bit patterns)."""

    def __init__(self, data: bytes, dtype):
        self.bfloat16 = dtype == "bfloat16"
        self.array = np.frombuffer(data, dtype=np.uint16 if self.bfloat16 else dtype)


class Bfloat16Array:
    """bfloat16 values as uint16 bit patterns (NumPy has no bfloat16)."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits
        self.shape = bits.shape

    def to_float32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored):
    itemsize = storage.array.itemsize
    if len(size) == 0:
        values = storage.array[offset:offset + 1].reshape(())
    else:
        values = np.lib.stride_tricks.as_strided(
            storage.array[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
        ).copy()
    return Bfloat16Array(values) if storage.bfloat16 else values


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(handle)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refused to load: the pickle asks for global {module}.{name}, "
                "which is not needed to rebuild tensors (nothing was executed)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.source}: unsupported storage type {storage_type!r}")
        if key not in self.storages:
            data = self.archive.read(f"{self.prefix}data/{key}")
            self.storages[key] = _Storage(data, _STORAGE_DTYPES[storage_type.name])
        return self.storages[key]


def read_torch_checkpoint(path: str | Path) -> dict:
    """A torch-saved state dict as {name: np.ndarray | Bfloat16Array}, without importing torch."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (legacy or corrupt pickle files are refused)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as handle:
            try:
                state = _RestrictedUnpickler(handle, archive, prefix, path).load()
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{path}: unreadable pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(state).__name__}, not a state dict")
    return dict(state)
