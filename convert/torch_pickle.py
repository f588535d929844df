"""Read PyTorch zip checkpoints (`.pth`, `.pt`, `.bin`) without torch and without running code.

A torch checkpoint is a zip holding `data.pkl` plus one raw file per storage. The pickle is
read by an unpickler that resolves only the globals needed to rebuild tensors and plain
containers; any other global (`os.system`, `builtins.eval`, …) is refused before it can be
called, with an error naming it. Tensors come back lazy (`TorchTensor`): their shape and dtype
are known at once, their bytes are read from the zip only when asked for, one at a time, so a
converter's memory stays near one tensor.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from aimv2_mlx.weights import CheckpointError

# storage class -> (dtype name, NumPy dtype holding its bytes; bfloat16 as uint16 bit patterns)
_STORAGE_DTYPES = {
    "DoubleStorage": ("float64", np.float64),
    "FloatStorage": ("float32", np.float32),
    "HalfStorage": ("float16", np.float16),
    "BFloat16Storage": ("bfloat16", np.uint16),
    "LongStorage": ("int64", np.int64),
    "IntStorage": ("int32", np.int32),
    "ShortStorage": ("int16", np.int16),
    "CharStorage": ("int8", np.int8),
    "ByteStorage": ("uint8", np.uint8),
    "BoolStorage": ("bool", np.bool_),
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    """Where a storage's bytes live in the archive; nothing is read yet."""

    def __init__(self, path: Path, entry: str, dtype: str, numpy_dtype, nbytes: int):
        self.path, self.entry, self.dtype, self.numpy_dtype = path, entry, dtype, np.dtype(numpy_dtype)
        self.numel = nbytes // self.numpy_dtype.itemsize


class TorchTensor:
    """A tensor of a torch checkpoint, read from the zip only by `numpy()`."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.stride = storage, offset, stride
        self.shape = size
        self.dtype = storage.dtype
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
        if extent > storage.numel:
            raise CheckpointError(
                f"{storage.path}: tensor of shape {size} reaches element {extent} of a storage "
                f"holding {storage.numel} (corrupt file)"
            )

    def numpy(self) -> np.ndarray:
        """The values (bfloat16 as uint16 bit patterns: NumPy has no bfloat16)."""
        with zipfile.ZipFile(self.storage.path) as archive:
            data = np.frombuffer(archive.read(self.storage.entry), dtype=self.storage.numpy_dtype)
        if not self.shape:
            return data[self.offset:self.offset + 1].reshape(()).copy()
        itemsize = data.itemsize
        return np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.shape, strides=tuple(s * itemsize for s in self.stride)
        ).copy()


class Bfloat16Array:
    """bfloat16 values as uint16 bit patterns (NumPy has no bfloat16)."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits
        self.shape = bits.shape

    def to_float32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored):
    return TorchTensor(storage, int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


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
            entry = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(entry)
            except KeyError:
                raise CheckpointError(f"{self.source}: storage {entry!r} is missing from the archive") from None
            dtype, numpy_dtype = _STORAGE_DTYPES[storage_type.name]
            self.storages[key] = _Storage(self.source, entry, dtype, numpy_dtype, info.file_size)
        return self.storages[key]


def open_torch_checkpoint(path: str | Path) -> dict[str, TorchTensor]:
    """A torch-saved state dict as {name: TorchTensor}, without importing torch or reading data."""
    path = Path(path).expanduser()
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (legacy or corrupt pickle files are refused)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
            prefix = pickles[0][: -len("data.pkl")]
            with archive.open(pickles[0]) as handle:
                state = _RestrictedUnpickler(handle, archive, prefix, path).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable pickle ({type(exc).__name__}: {exc})") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(value, TorchTensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(state)


def read_torch_checkpoint(path: str | Path) -> dict:
    """Every tensor of a torch checkpoint as {name: np.ndarray | Bfloat16Array}, read eagerly."""
    return {
        key: Bfloat16Array(t.numpy()) if t.dtype == "bfloat16" else t.numpy()
        for key, t in open_torch_checkpoint(path).items()
    }

