"""A search index of a living folder: `update_index()`, the run behind `aimv2 index`.

Layout of an index folder (every name ours; nothing else there is ever deleted):

- `index.sqlite`: table `files` (path, file, offset, size, mtime, sha256, row, width, height,
  reason), one record per input, rows in sorted path order; table `meta` (the model's name and
  weights fingerprint, preprocessing, pooling, dtype, the vectors file's generation); table
  `pending` (files embedded by an update that was interrupted, for the next run to reuse).
- `vectors-N.npy`: the L2-normalised vectors, (rows, D), memory-mappable; `row` in `files`
  points into it. An update writes generation N+1 and then commits the table in one SQLite
  transaction, so a reader (or a killed run) sees either the old or the new index, whole.
- `pending-N.npy`: chunks of vectors an interrupted update already computed.
- `ann-N.usearch`: the HNSW graph of generation N, made by the first `search(backend="ann")`.
- `failures.jsonl`: the files that could not be used, with the reason.

An update reuses a file whose path, size and mtime are unchanged without opening it; any other
file is hashed (SHA-256), and a hash already in the index (a moved or renamed file, or one only
touched) reuses that vector. Only new and changed files reach the encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .data.sources import Item, discover, display
from .embed import embed_batches, model_identity
from .errors import Aimv2Error, SettingError
from .folders import atomic_write, is_empty, locked
from .images import DEFAULT_MAX_MEGAPIXELS
from .shards import METADATA, read_shards

DATABASE = "index.sqlite"
TOOL = "aimv2 index"
DTYPES = ("float32", "float16")
# What every update must share with the index already there.
SETTINGS = ("model", "preprocess", "pool", "dtype")
VECTORS = re.compile(r"(vectors|pending)-(\d+)\.npy|(ann)-(\d+)\.usearch")
TEMPORARY = re.compile(r"\.((vectors|pending)-\d+\.npy|ann-\d+\.usearch|failures\.jsonl)\.tmp-\d+")
PENDING_CHUNK = 256  # vectors saved per chunk while an update runs: the most a kill -9 loses
COLUMNS = "path, file, offset, size, mtime, sha256, row, width, height, reason"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, file BLOB NOT NULL,
    offset INTEGER NOT NULL, size INTEGER NOT NULL, mtime REAL NOT NULL, sha256 TEXT,
    row INTEGER, width INTEGER, height INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS pending (path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime REAL NOT NULL, sha256 TEXT NOT NULL, chunk INTEGER NOT NULL, row INTEGER NOT NULL,
    width INTEGER, height INTEGER);
"""


class IndexFolderError(Aimv2Error, ValueError):
    """An index folder that cannot be used as asked (another model, not an index)."""


@dataclass
class IndexSummary:
    """What an update did; `aimv2 index --json` prints the counts of `to_dict`."""

    index: str
    model: str
    embedded: int  # files that reached the encoder in this run
    reused: int  # files whose vector was kept (unchanged, or found again by content)
    moved: int  # of `reused`: found at a new path through their content
    removed: int  # records of files that are gone (and did not reappear elsewhere)
    failed: int  # files listed in failures.jsonl
    total: int  # files with a vector in the index now
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            key: getattr(self, key) for key in ("embedded", "reused", "removed", "failed", "total")
        }


@dataclass
class Record:
    """One input file as the index knows it: where it is, what it held, and its row (or reason)."""

    path: str
    file: bytes
    offset: int
    size: int
    mtime: float
    sha256: str | None = None
    row: int | None = None
    width: int | None = None
    height: int | None = None
    reason: str | None = None
    vector: np.ndarray | None = field(default=None, repr=False)

    def state(self) -> tuple:
        """What the table stores of the file, its row aside."""
        return (
            self.file,
            self.offset,
            self.size,
            self.mtime,
            self.sha256,
            self.width,
            self.height,
            self.reason,
        )

    def item(self) -> Item:
        return Item(self.path, os.fsdecode(self.file), self.size, self.mtime, self.offset)


def index_pool(model) -> str:
    """The vector a search compares: LiT's projected image embedding (its text-image space), an
    encoder's attention-pool head where it has one, else mean-pooled tokens."""
    config = model.config
    return "head" if config.is_lit or config.vision.use_head else "mean"


def index_settings(model, dtype: str) -> dict:
    config = model.config
    location = model.location
    identity = dict(model_identity(model), path=str(location.path) if location else None)
    settings = {
        "model": identity,
        "preprocess": asdict(config.preprocess),
        "pool": index_pool(model),
        "normalize": True,
        "dtype": dtype,
    }
    return json.loads(json.dumps(settings))  # tuples as lists, as read back


def update_index(
    inputs,
    index: str | os.PathLike,
    model,
    *,
    batch_size: int = 8,
    dtype: str = "float32",
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    workers: int = 0,
    progress: Callable[[int, int, int], None] | None = None,
) -> IndexSummary:
    """Bring the index folder `index` up to date with the images under `inputs`.

    Unchanged files (path, size, mtime) are reused without being opened, moved or touched ones
    through their SHA-256; new and changed files are embedded, deleted ones dropped. An index
    made with another model or preprocessing is refused (`IndexFolderError`). The folder is locked
    while the update runs; a killed or interrupted update leaves the previous index whole and
    its finished vectors for the next run. `progress(done, total, failed)` follows the encoder.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise SettingError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    if batch_size < 1:
        raise SettingError("--batch-size must be at least 1")
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    items = discover(inputs)
    index = Path(index).expanduser()
    _check_ours(index)
    settings = index_settings(model, dtype)
    with locked(index):
        _check_ours(index)
        if not items and not (index / DATABASE).exists():
            raise FileNotFoundError(f"{', '.join(map(os.fsdecode, inputs))}: no images found")
        with _sqlite_errors(index), contextlib.closing(_connect(index)) as db:
            _check_settings(index, db, settings)
            _drop_temporary(index)
            old, generation = _records(db), int(_meta(db).get("generation", "0"))
            vectors = _open_vectors(index, generation, old)
            records, reused, moved, todo = _plan(db, index, items, old, vectors, inputs, workers)
            embedded = _embed(
                db, index, todo, model, batch_size, dtype, max_megapixels, workers, progress
            )
            if _same(records, old) and not db.execute("SELECT 1 FROM pending LIMIT 1").fetchone():
                # nothing to write but the failures list
                total = sum(r.vector is not None for r in records)
            else:
                total, generation = (
                    _commit(db, index, records, generation, dtype, model),
                    generation + 1,
                )
            _write_failures(index, records)
            _drop_unreferenced(index, generation)
    paths = {r.path for r in records}
    moved_content = {r.sha256 for r in records if r.path not in old and r.vector is not None}
    removed = sum(
        path not in paths and record.sha256 not in moved_content for path, record in old.items()
    )
    return IndexSummary(
        index=str(index),
        model=model.config.name,
        embedded=embedded,
        reused=reused,
        moved=moved,
        removed=removed,
        failed=len(records) - total,
        total=total,
        seconds=time.perf_counter() - start,
    )


@contextlib.contextmanager
def _sqlite_errors(index: Path):
    """A damaged, foreign or unwritable `index.sqlite` (or a full disk) as one error naming it."""
    try:
        yield
    except sqlite3.Error as exc:
        raise IndexFolderError(f"{index / DATABASE}: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, IndexFolderError):
            raise
        raise IndexFolderError(f"{index / DATABASE}: not a readable index ({exc})") from None


def _connect(index: Path) -> sqlite3.Connection:
    db = sqlite3.connect(index / DATABASE, timeout=30)
    db.executescript(SCHEMA)
    return db


def _meta(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT key, value FROM meta"))


def _check_ours(index: Path) -> None:
    """Write only into a new or empty folder, or an index an earlier update made."""
    if is_empty(index) or (index / DATABASE).is_file():
        return
    raise FileExistsError(
        f"{index}: not empty and not an aimv2 index (no {DATABASE}); "
        "choose a new or empty index folder"
    )


def _check_settings(index: Path, db: sqlite3.Connection, settings: dict) -> None:
    meta = _meta(db)
    if "settings" not in meta:
        with db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('tool', ?)", (TOOL,))
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (json.dumps(settings),)
            )
        return
    existing = json.loads(meta["settings"])
    changed = [
        key
        for key in SETTINGS
        if _comparable(key, existing.get(key)) != _comparable(key, settings[key])
    ]
    if changed:
        theirs = existing.get("model") or {}
        raise IndexFolderError(
            f"{index}: made with a different {', '.join(changed)} (model "
            f"{theirs.get('name')}, weights {theirs.get('weights_sha256')}); an index "
            "holds one model's vectors: choose another index folder"
        )
    with db:  # the same model, perhaps loaded from elsewhere: record where, for search to load it
        db.execute("UPDATE meta SET value = ? WHERE key = 'settings'", (json.dumps(settings),))


def _comparable(key: str, value):
    if key == "model" and isinstance(value, dict):
        return value.get("name"), value.get("weights_sha256")
    return value


def _records(db: sqlite3.Connection) -> dict[str, Record]:
    rows = db.execute(f"SELECT {COLUMNS} FROM files")
    return {row[0]: Record(*row) for row in rows}


def _open_vectors(index: Path, generation: int, old: dict[str, Record]) -> np.ndarray | None:
    """The current vectors, memory-mapped, checked against the rows the table points to."""
    rows = sorted(r.row for r in old.values() if r.row is not None)
    if not generation:
        return None
    path = index / f"vectors-{generation}.npy"
    try:
        vectors = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise IndexFolderError(
            f"{path}: cannot read the index's vectors ({exc}); make a new index"
        ) from None
    if vectors.ndim != 2 or rows != list(range(len(vectors))):
        raise IndexFolderError(
            f"{path}: holds {vectors.shape} vectors for {len(rows)} files; the index is "
            "damaged: make a new index"
        )
    return vectors


def _drop_temporary(index: Path) -> None:
    """A killed run's temporary files (ours by name: the folder is locked)."""
    for path in index.iterdir():
        if TEMPORARY.fullmatch(path.name):
            path.unlink()


def _drop_unreferenced(index: Path, keep: int) -> None:
    """Older vectors generations (and their ANN graphs) and pending chunks, once the new table is
    committed."""
    for path in index.iterdir():
        match = VECTORS.fullmatch(path.name)
        if match and not (match[1] in ("vectors", None) and int(match[2] or match[4]) == keep):
            path.unlink()


def _source(item: Item, inputs: list) -> tuple[str, bytes]:
    """The path shown and stored for an item (absolute), and the file to open."""
    file = os.fsencode(os.path.abspath(item.path))
    if item.offset < 0:
        return display(file), file
    member = item.key.split("/", 1)[1] if len(inputs) > 1 else item.key
    return f"{display(file)}/{member}", file


def _sha256(item: Item) -> str:
    digest = hashlib.sha256()
    with item.open() as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plan(
    db, index: Path, items: list, old: dict[str, Record], vectors, inputs: list, workers: int
):
    """Every input's record: reused from the table or a pending chunk, or to embed (`todo`)."""
    chunks: dict[int, np.ndarray] = {}

    def pending_vector(chunk: int, row: int) -> np.ndarray:
        if chunk not in chunks:
            chunks[chunk] = np.load(index / f"pending-{chunk}.npy", mmap_mode="r")
        return chunks[chunk][row]

    pending = {}
    for path, size, mtime, sha, chunk, row, width, height in db.execute("SELECT * FROM pending"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # a damaged chunk: recomputed
            pending_vector(chunk, row)
            pending[(path, size, mtime)] = pending[sha] = (sha, chunk, row, width, height)
    by_content = {r.sha256: r for r in old.values() if r.row is not None and r.sha256}
    records, unknown, reused, moved = [], [], 0, 0
    for item in items:
        path, file = _source(item, inputs)
        record = Record(path, file, item.offset, item.size, item.mtime)
        known = old.get(path)
        if known and known.size == item.size and known.mtime == item.mtime:
            record.sha256, record.width, record.height, record.reason = (
                known.sha256,
                known.width,
                known.height,
                known.reason,
            )
            if known.row is not None:
                record.vector, reused = vectors[known.row], reused + 1
        elif (path, item.size, item.mtime) in pending:
            sha, chunk, row, record.width, record.height = pending[(path, item.size, item.mtime)]
            record.sha256, record.vector = sha, pending_vector(chunk, row)
        else:
            unknown.append(record)
        records.append(record)
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(_hash_or_reason, (r.item() for r in unknown)))
    todo = []
    for record, (sha, reason) in zip(unknown, hashes, strict=True):
        record.sha256, record.reason = sha, reason
        if reason:
            continue
        if sha in by_content:
            known = by_content[sha]
            record.vector, record.width, record.height = (
                vectors[known.row],
                known.width,
                known.height,
            )
            reused += 1
            moved += record.path not in old
        elif sha in pending:
            _, chunk, row, record.width, record.height = pending[sha]
            record.vector = pending_vector(chunk, row)
        else:
            todo.append(record)
    return records, reused, moved, todo


def _hash_or_reason(item: Item) -> tuple[str | None, str | None]:
    try:
        return _sha256(item), None
    except OSError as exc:
        return None, display(f"cannot read ({exc.strerror or exc})")


def _embed(
    db,
    index: Path,
    todo: list[Record],
    model,
    batch_size: int,
    dtype: str,
    max_megapixels,
    workers: int,
    progress,
) -> int:
    """Embed `todo` into its records; finished vectors are saved as pending chunks as they come,
    and on Ctrl-C, so an interrupted update loses at most one chunk. Returns how many embedded."""
    chunk_id = 1 + max(
        (int(m[2]) for m in map(VECTORS.fullmatch, os.listdir(index)) if m and m[1] == "pending"),
        default=0,
    )
    waiting: list[Record] = []

    def save_chunk() -> None:
        nonlocal chunk_id, waiting
        if not waiting:
            return
        array = np.stack([r.vector for r in waiting]).astype(dtype)
        atomic_write(index / f"pending-{chunk_id}.npy", lambda tmp: _save_npy(tmp, array))
        with db:
            db.executemany(
                "INSERT INTO pending VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (r.path, r.size, r.mtime, r.sha256, chunk_id, i, r.width, r.height)
                    for i, r in enumerate(waiting)
                ],
            )
        chunk_id, waiting = chunk_id + 1, []

    by_item = {}
    done = failed = 0
    try:
        items = []
        for record in todo:
            item = record.item()
            by_item[id(item)] = record
            items.append(item)
        pool = index_pool(model)
        for good, vectors, bad in embed_batches(
            items,
            model,
            batch_size=batch_size,
            pool=pool,
            normalize=True,
            max_megapixels=max_megapixels,
            workers=workers,
        ):
            for result in bad:
                by_item[id(result.source)].reason = result.error
            for result, vector in zip(good, vectors if vectors is not None else [], strict=True):
                record = by_item[id(result.source)]
                record.vector, record.width, record.height = vector, result.width, result.height
                waiting.append(record)
            done, failed = done + len(good) + len(bad), failed + len(bad)
            if len(waiting) >= PENDING_CHUNK:
                save_chunk()
            if progress:
                progress(done, len(todo), failed)
    finally:
        save_chunk()
    return done - failed


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with open(tmp, "wb") as fh:
        np.save(fh, array)


def _same(records: list[Record], old: dict[str, Record]) -> bool:
    """True when the table would not change (a re-run over an unchanged folder)."""
    return len(records) == len(old) and all(
        r.path in old and r.state() == old[r.path].state() for r in records
    )


def _commit(db, index: Path, records: list[Record], generation: int, dtype: str, model) -> int:
    """Write generation N+1 of the vectors, then the table, pending cleared, in one transaction."""
    records.sort(key=lambda r: r.path)
    kept = [r for r in records if r.vector is not None]
    for record in records:
        record.row = None
    for row, record in enumerate(kept):
        record.row = row
    width = kept[0].vector.shape[-1] if kept else _width(model)
    array = np.empty((len(kept), width), dtype)
    for row, record in enumerate(kept):
        array[row] = record.vector
    atomic_write(index / f"vectors-{generation + 1}.npy", lambda tmp: _save_npy(tmp, array))
    with db:
        db.execute("DELETE FROM files")
        db.executemany(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.path,
                    r.file,
                    r.offset,
                    r.size,
                    r.mtime,
                    r.sha256,
                    r.row,
                    r.width,
                    r.height,
                    r.reason,
                )
                for r in records
            ],
        )
        db.execute("DELETE FROM pending")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(generation + 1),))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('rows', ?)", (str(len(kept)),))
    return len(kept)


def _write_failures(index: Path, records: list[Record]) -> None:
    lines = "".join(
        json.dumps({"path": r.path, "reason": r.reason}, ensure_ascii=False) + "\n"
        for r in records
        if r.vector is None
    )
    atomic_write(index / "failures.jsonl", lambda tmp: tmp.write_text(lines))


def _width(model) -> int:
    config = model.config
    return config.projection_dim if config.is_lit else config.vision.hidden_size


@dataclass
class Index:
    """An index opened for reading: vectors memory-mapped, one path per row, and its settings."""

    folder: Path
    vectors: np.ndarray  # (rows, D), L2-normalised, float32 or float16
    paths: list[str]
    files: list[Record]
    settings: dict
    generation: int

    @property
    def model(self) -> dict:
        return self.settings["model"]


def is_index(folder: str | os.PathLike) -> bool:
    return (Path(folder).expanduser() / DATABASE).is_file()


def open_index(folder: str | os.PathLike) -> Index:
    """Read an index folder, in one read transaction (an update running meanwhile is not seen)."""
    folder = Path(folder).expanduser()
    if not is_index(folder):
        raise FileNotFoundError(
            f"{folder}: not an aimv2 index (no {DATABASE}); make one with aimv2 index"
        )
    # Read-write where allowed, so SQLite can roll back a transaction a killed update left open.
    mode = "rw" if os.access(folder, os.W_OK) else "ro"
    db = sqlite3.connect(
        f"{(folder / DATABASE).resolve().as_uri()}?mode={mode}", uri=True, timeout=30
    )
    try:
        try:
            db.execute("BEGIN")
            meta = _meta(db)
            records = [
                Record(*row)
                for row in db.execute(
                    f"SELECT {COLUMNS} FROM files WHERE row IS NOT NULL ORDER BY row"
                )
            ]
        except sqlite3.Error as exc:
            raise IndexFolderError(f"{folder / DATABASE}: not a readable index ({exc})") from None
        if "settings" not in meta or "generation" not in meta:
            raise IndexFolderError(
                f"{folder}: an index whose first update has not finished; run aimv2 index again"
            )
        path = folder / f"vectors-{meta['generation']}.npy"
        try:
            # opened inside the read: no update can drop it first
            vectors = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise IndexFolderError(f"{path}: cannot read the index's vectors ({exc})") from None
        db.execute("COMMIT")
    finally:
        db.close()
    if (
        vectors.ndim != 2
        or len(vectors) != len(records)
        or any(r.row != i for i, r in enumerate(records))
    ):
        raise IndexFolderError(
            f"{path}: holds {vectors.shape} vectors for {len(records)} files; the index is damaged"
        )
    try:
        settings, generation = json.loads(meta["settings"]), int(meta["generation"])
    except ValueError as exc:
        raise IndexFolderError(f"{folder / DATABASE}: not a readable index ({exc})") from None
    return Index(folder, vectors, [r.path for r in records], records, settings, generation)


def read_embeddings(folder: str | os.PathLike) -> tuple[np.ndarray, pa.Table]:
    """All rows of a finished embedding folder (`aimv2 embed`) or search index (`aimv2 index`):
    (vectors, metadata table), in row order."""
    folder = Path(folder).expanduser()
    return read_index(folder) if is_index(folder) else read_shards(folder)


def read_index(folder: str | os.PathLike) -> tuple[np.ndarray, pa.Table]:
    """(vectors, metadata table) of an index, as `read_embeddings` gives an embed folder's."""
    index = open_index(folder)
    table = pa.table(
        {
            "path": [r.path for r in index.files],
            "size": np.array([r.size for r in index.files], np.int64),
            "mtime": np.array([r.mtime for r in index.files], np.float64),
            "width": np.array([r.width for r in index.files], np.int32),
            "height": np.array([r.height for r in index.files], np.int32),
        },
        schema=METADATA,
    )
    return np.asarray(index.vectors), table
