"""safetensors without loading whole files: a checked header reader, per-tensor reads, and a
writer that streams tensors to disk one at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each name to its
dtype, shape and byte range, then the raw bytes. Reading the header first lets every damaged
file (truncated, inconsistent offsets) be refused before anything is converted; writing the
header first (all shapes are known in advance) lets a converter hold one tensor at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .weights import CheckpointError

# safetensors code -> (our dtype name, NumPy dtype holding its bytes; bfloat16 as uint16)
CODES = {
    "F64": ("float64", np.float64),
    "F32": ("float32", np.float32),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
    "I64": ("int64", np.int64),
    "I32": ("int32", np.int32),
    "I16": ("int16", np.int16),
    "I8": ("int8", np.int8),
    "U32": ("uint32", np.uint32),
    "U8": ("uint8", np.uint8),
    "BOOL": ("bool", np.bool_),
}
_CODE_OF = {name: code for code, (name, _) in CODES.items()}
NUMPY_OF = {name: np.dtype(numpy) for name, numpy in CODES.values()}


@dataclass(frozen=True)
class Entry:
    """One tensor's place in a safetensors file."""

    shape: tuple[int, ...]
    dtype: str
    start: int  # absolute byte offset in the file
    nbytes: int


# The safetensors reference reader refuses headers above 100 MB (safetensors/src/tensor.rs,
# MAX_HEADER_SIZE); a real one is a few hundred KB.
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> dict[str, Entry]:
    """Every tensor's entry, after checking the header against the file's real size.

    Each field is checked for its type as well as its value: offsets inside the data, in order,
    not overlapping, and each range exactly the bytes its dtype and shape need.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: not a safetensors file (shorter than its 8-byte header length)"
            )
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header of {header_len} bytes, file "
                f"of {size})"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(
                f"{path}: not a safetensors file (unreadable header: {exc})"
            ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    entries = {
        key: _entry(path, key, info, data_start, data_size)
        for key, info in header.items()
        if key != "__metadata__"
    }
    previous_end, previous = 0, None
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].nbytes)):
        if entry.start - data_start < previous_end:
            raise CheckpointError(f"{path}: tensors {previous!r} and {key!r} overlap in the file")
        previous_end, previous = entry.start - data_start + entry.nbytes, key
    return entries


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, key: str, info, data_start: int, data_size: int) -> Entry:
    """One header field, checked: dtype known, shape non-negative ints, offsets fitting the
    shape.
    """
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(
            f"{path}: malformed header entry for tensor {key!r} (needs dtype, shape, data_offsets)"
        )
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in CODES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {code!r}")
    if not (isinstance(shape, list) and all(_whole(n) and n >= 0 for n in shape)):
        raise CheckpointError(f"{path}: tensor {key!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(n) for n in offsets)):
        raise CheckpointError(f"{path}: tensor {key!r} has malformed data_offsets {offsets!r}")
    dtype = CODES[code][0]
    begin, end = offsets
    nbytes = math.prod(shape) * NUMPY_OF[dtype].itemsize
    if begin < 0 or end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {key!r}: byte range {begin}..{end} does not fit shape {tuple(shape)}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor {key!r} ends at byte {end} of the data, the file holds "
            f"{data_size}"
        )
    return Entry(tuple(shape), dtype, data_start + begin, nbytes)


def read_tensor(path: Path, entry: Entry) -> np.ndarray:
    """One tensor's values (bfloat16 as uint16 bit patterns)."""
    dtype = NUMPY_OF[entry.dtype]
    count = entry.nbytes // dtype.itemsize
    values = np.fromfile(path, dtype=dtype, count=count, offset=entry.start)
    if values.size != count:  # the file shrank since its header was checked
        raise CheckpointError(f"{path}: truncated: a tensor ends past the end of the file")
    return values.reshape(entry.shape)


def dtype_name(dtype: mx.Dtype) -> str:
    """'float32', 'bfloat16', … for an MLX dtype."""
    return str(dtype).removeprefix("mlx.core.")


def write_streaming(
    path: Path,
    specs: Iterable[tuple[str, tuple[int, ...], str]],
    produce: Callable[[str], mx.array],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors given as (name, shape, dtype) specs, calling `produce(name)` for each in turn.

    The header is written first from the specs, then each tensor's bytes as it is produced and
    freed, so memory holds one tensor at a time. Returns the bytes of tensor data written.
    """
    specs = list(specs)
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * NUMPY_OF[dtype].itemsize
        header[name] = {
            "dtype": _CODE_OF[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    try:
        with open(path, "wb") as handle:
            handle.write(len(raw).to_bytes(8, "little"))
            handle.write(raw)
            for name, shape, dtype in specs:
                value = produce(name)
                if tuple(value.shape) != tuple(shape) or dtype_name(value.dtype) != dtype:
                    raise AssertionError(
                        f"{name}: produced {value.shape} {value.dtype}, planned {shape} {dtype}"
                    )
                if value.dtype == mx.bfloat16:
                    value = value.view(mx.uint16)
                handle.write(memoryview(np.ascontiguousarray(np.array(value))).cast("B"))
                del value
                mx.clear_cache()
    except OSError as exc:
        exc.filename = exc.filename or str(path)  # a failed write() names no file: say which
        raise
    return offset
