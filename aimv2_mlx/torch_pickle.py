"""Read PyTorch zip checkpoints (`.pth`, `.pt`, `.bin`) without torch and without running code.

A torch checkpoint is a zip holding `data.pkl` plus one raw file per storage. The pickle is
read by an unpickler that resolves only the globals needed to rebuild tensors and plain
containers; any other global (`os.system`, `builtins.eval`, …) is refused before it can be
called, with an error naming it. Tensors come back lazy (`TorchTensor`): their shape and dtype
are known at once, their bytes are read from the zip only when asked for, one at a time, so a
converter's memory stays near one tensor.

Nothing in the file is trusted: every tensor's extent is checked against its storage, every
storage's claimed size against the bytes the archive holds, only the bytes a tensor spans are
read, and no opcode can change the reader's own objects.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .weights import CheckpointError

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

_MAX_DIMS = 64  # torch's own limit on a tensor's dimensions
# A storage's claimed size must be plausible for the bytes the archive holds: torch.save writes
# storages uncompressed (caffe2/serialize/inline_container.cc), so a compressed one is a re-zip,
# and trained weights deflate by far less than this ratio; a storage this much larger than what
# its tensors span is refused too (only what they span is ever read).
_MAX_COMPRESSION_RATIO = 32
_MAX_UNUSED_RATIO = 8
_SLACK_BYTES = 1 << 20
MAX_PICKLE_BYTES = 1 << 28


class Refused(Exception):
    """A reason to refuse the file, raised where the file's name is not at hand."""


class _Sealed:
    """Objects of the reader that a pickle may receive but never change.

    The pickle `BUILD` opcode sets state on whatever object is on its stack; a hostile pickle
    uses it on an allow-listed singleton (every later checkpoint in the process would change) or
    on a tensor after its extent was checked. No torch checkpoint builds these objects.
    """

    def __setstate__(self, state):
        raise Refused(
            f"the pickle tries to change a {type(self).__name__.lstrip('_')} (BUILD opcode), "
            "which no torch checkpoint does"
        )


class _StorageType(_Sealed):
    def __init__(self, name: str):
        self.name = name


class _Rebuild(_Sealed):
    """An allow-listed rebuild function, callable by the pickle but not changeable by it."""

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)


class _Storage(_Sealed):
    """Where a storage's bytes live in the archive; nothing is read yet."""

    def __init__(self, path: Path, entry: str, dtype: str, numpy_dtype, nbytes: int):
        self.path, self.entry, self.dtype, self.numpy_dtype = (
            path,
            entry,
            dtype,
            np.dtype(numpy_dtype),
        )
        self.nbytes = nbytes
        self.numel = nbytes // self.numpy_dtype.itemsize


class TorchTensor(_Sealed):
    """A tensor of a torch checkpoint, read from the zip only by `numpy()`.

    Its whole extent (offset, sizes, strides, in its storage's dtype) is checked against its
    storage when the pickle makes it, so `numpy()` reads exactly the bytes it spans and nothing
    outside them: torch tensors have non-negative strides and lie inside their storage
    (torch/_utils.py `_rebuild_tensor_v2` -> `Tensor.set_`, which checks the same bounds).
    """

    def __init__(
        self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ):
        self.storage, self.offset, self.stride = storage, offset, stride
        self.shape = size
        self.dtype = storage.dtype
        self.numel = math.prod(size)
        self.end = (
            offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
            if self.numel
            else offset
        )

    def numpy(self) -> np.ndarray:
        """The values (bfloat16 as uint16 bit patterns: NumPy has no bfloat16)."""
        itemsize = self.storage.numpy_dtype.itemsize
        count = self.end - self.offset
        where = f"{self.storage.path}: storage {self.storage.entry!r}"
        try:
            with (
                zipfile.ZipFile(self.storage.path) as archive,
                archive.open(self.storage.entry) as handle,
            ):
                handle.seek(self.offset * itemsize)
                raw = handle.read(count * itemsize)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise CheckpointError(f"{where} is unreadable ({exc})") from None
        if len(raw) != count * itemsize:
            raise CheckpointError(f"{where} is truncated")
        data = np.frombuffer(raw, dtype=self.storage.numpy_dtype)
        if not self.shape:
            return data[:1].reshape(()).copy()
        return np.lib.stride_tricks.as_strided(
            data, shape=self.shape, strides=tuple(s * itemsize for s in self.stride)
        ).copy()


class Bfloat16Array:
    """bfloat16 values as uint16 bit patterns (NumPy has no bfloat16)."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits
        self.shape = bits.shape

    def to_float32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise Refused(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if not (
        _whole(offset)
        and isinstance(size, (tuple, list))
        and isinstance(stride, (tuple, list))
        and all(map(_whole, size))
        and all(map(_whole, stride))
    ):
        raise Refused(f"a tensor of {storage.entry!r} has a malformed offset, size or stride")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or len(size) > _MAX_DIMS:
        raise Refused(
            f"a tensor of {storage.entry!r} has {len(size)} sizes and {len(stride)} strides"
        )
    if offset < 0 or min(size + stride, default=0) < 0:
        raise Refused(
            f"a tensor of {storage.entry!r} has a negative offset, size or stride "
            f"(offset {offset}, size {size}, stride {stride})"
        )
    tensor = TorchTensor(storage, offset, size, stride)
    if tensor.end > storage.numel or tensor.numel > storage.numel:
        raise Refused(
            f"tensor of shape {size} (offset {offset}, stride {stride}) reaches beyond its storage "
            f"{storage.entry!r} of {storage.numel} {storage.dtype} elements (corrupt file)"
        )
    return tensor


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuild(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Rebuild(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Rebuild(_rebuild_parameter),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(handle)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.archive_bytes = os.path.getsize(source)
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
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.source}: unsupported storage type {storage_type!r}")
        dtype, numpy_dtype = _STORAGE_DTYPES[storage_type.name]
        if key in self.storages:
            if self.storages[key].dtype != dtype:
                raise Refused(
                    f"storage {key!r} is named with two dtypes ({self.storages[key].dtype}, "
                    f"{dtype})"
                )
            return self.storages[key]
        entry = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(entry)
        except KeyError:
            raise CheckpointError(
                f"{self.source}: storage {entry!r} is missing from the archive"
            ) from None
        check_plausible(entry, info, self.archive_bytes)
        self.storages[key] = _Storage(self.source, entry, dtype, numpy_dtype, info.file_size)
        return self.storages[key]


def check_plausible(entry: str, info: zipfile.ZipInfo, archive_bytes: int) -> None:
    """Refuse an archive member whose claimed size the archive cannot hold (a zip bomb)."""
    if info.header_offset + info.compress_size > archive_bytes:
        raise Refused(f"{entry!r} claims {info.compress_size} bytes past the end of the file")
    stored = info.compress_type == zipfile.ZIP_STORED
    if (stored and info.file_size != info.compress_size) or (
        info.file_size > _MAX_COMPRESSION_RATIO * info.compress_size + _SLACK_BYTES
    ):
        raise Refused(
            f"{entry!r} claims {info.file_size:,} bytes from {info.compress_size:,} in the file "
            "(a zip bomb: torch.save does not compress)"
        )


def check_storage_use(tensors) -> None:
    """Refuse a storage far larger than the tensors made from it span."""
    storages, ends = {}, {}
    for tensor in tensors:
        key = id(tensor.storage)
        storages[key], ends[key] = tensor.storage, max(ends.get(key, 0), tensor.end)
    for key, storage in storages.items():
        end = ends[key]
        used = end * storage.numpy_dtype.itemsize
        if storage.nbytes > _MAX_UNUSED_RATIO * used + _SLACK_BYTES:
            raise Refused(
                f"storage {storage.entry!r} holds {storage.nbytes:,} bytes but its tensors "
                f"use only {used:,}"
            )


@contextlib.contextmanager
def pickle_errors(path: Path):
    """Whatever goes wrong while unpickling `path` (a hostile or damaged file) as one
    `CheckpointError` naming it; our own refusals keep their reason."""
    try:
        yield
    except CheckpointError:
        raise
    except Refused as exc:
        raise CheckpointError(f"{path}: refused to load: {exc}") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable pickle ({type(exc).__name__}: {exc})") from None


def data_pickle(archive: zipfile.ZipFile, path: Path) -> str:
    """The name of a torch.save archive's one `data.pkl`, refused before it is read when its size
    is implausible for the archive or for a pickle of tensor references."""
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
    info = archive.getinfo(pickles[0])
    check_plausible(pickles[0], info, os.path.getsize(path))
    if info.file_size > MAX_PICKLE_BYTES:
        raise Refused(
            f"{pickles[0]!r} is {info.file_size:,} bytes; a checkpoint's pickle is a few MB"
        )
    return pickles[0]


def open_torch_checkpoint(path: str | Path) -> dict[str, TorchTensor]:
    """A torch-saved state dict as {name: TorchTensor}, without importing torch or reading data."""
    path = Path(path).expanduser()
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint (legacy or corrupt pickle files are refused)"
        )
    with pickle_errors(path):
        with zipfile.ZipFile(path) as archive:
            name = data_pickle(archive, path)
            with archive.open(name) as handle:
                state = RestrictedUnpickler(handle, archive, name[: -len("data.pkl")], path).load()
        for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{path}: the pickle holds a {type(state).__name__}, not a state dict"
            )
        for key, value in state.items():
            if not isinstance(value, TorchTensor):
                raise CheckpointError(
                    f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor"
                )
        check_storage_use(state.values())
    return {str(key): value for key, value in state.items()}


def read_torch_checkpoint(path: str | Path) -> dict:
    """Every tensor of a torch checkpoint as {name: np.ndarray | Bfloat16Array}, read eagerly."""
    return {
        key: Bfloat16Array(t.numpy()) if t.dtype == "bfloat16" else t.numpy()
        for key, t in open_torch_checkpoint(path).items()
    }
