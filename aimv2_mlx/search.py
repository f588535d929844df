"""Find images in an index by text (the LiT text tower), by example (any encoder), or both.

Exact search is one matrix-vector product over the memory-mapped vectors (in blocks, so memory
stays bounded) and a top-k; with `backend="ann"` an HNSW graph from the optional `usearch`
package is built once per index generation and saved beside it, for collections past a million.
A mixed query is the normalised sum of the text and image query vectors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .ann import ann_search
from .embed import embed, model_identity, same_model
from .errors import SettingError
from .index import Index, IndexFolderError, index_pool, open_index
from .model import load
from .text_embed import embed_texts

BLOCK = 1 << 16  # rows scored at a time
BACKENDS = ("exact", "ann")


@dataclass(frozen=True)
class Result:
    """One hit: the file's path and its cosine similarity to the query."""

    path: str
    score: float
    row: int

    def to_dict(self) -> dict:
        return {"path": self.path, "score": round(self.score, 6)}


def search(
    index: str | os.PathLike | Index,
    text: str | None = None,
    image=None,
    k: int = 20,
    model=None,
    backend: str = "exact",
) -> list[Result]:
    """The `k` files of `index` most similar to `text` and/or `image` (a path or PIL image), best
    first. `model` defaults to the one the index records (loaded from where it was loaded), and
    must be that model: a different one is refused."""
    if k < 1:
        raise SettingError(f"-k {k}: must be at least 1")
    if backend not in BACKENDS:
        raise SettingError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    index = index if isinstance(index, Index) else open_index(index)
    model = index_model(index, model)
    query = query_vector(index, model, text, image)
    if backend == "ann":
        rows, scores = ann_search(index, query, k)
    else:
        rows, scores = exact_top_k(index.vectors, query, k)
    return [
        Result(index.paths[row], float(score), int(row))
        for row, score in zip(rows, scores, strict=True)
    ]


def index_model(index: Index, model=None):
    """The index's own model: `model` if it is that one, else loaded from the recorded location."""
    recorded = index.model
    if model is None:
        if not recorded.get("path"):
            raise IndexFolderError(
                f"{index.folder}: records no model location; pass the model (-m)"
            )
        model = load(recorded["path"])
    identity = model_identity(model)
    if not same_model(identity, recorded):
        raise IndexFolderError(
            f"{index.folder}: indexed with {recorded.get('name')} (weights "
            f"{recorded.get('weights_sha256')}), not {identity['name']} (weights "
            f"{identity['weights_sha256']}); search with the index's model"
        )
    return model


def query_vector(index: Index, model, text: str | None, image) -> np.ndarray:
    """The unit query vector in the index's space: text, image, or their normalised sum."""
    if text is None and image is None:
        raise SettingError("give a text query, an --image, or both")
    parts = []
    if text is not None:
        parts.append(text_vector(model, text, index))
    if image is not None:
        parts.append(embed([image], model, pool=index_pool(model), normalize=True)[0])
    query = np.sum(parts, axis=0).astype(np.float32)
    norm = float(np.linalg.norm(query))
    if not norm > 0:
        raise SettingError("the text and image queries cancel out (their vectors are opposite)")
    return query / norm


def text_vector(model, text: str, index: Index | None = None) -> np.ndarray:
    """A text query's unit vector from the LiT text tower, embedded as `classify --zero-shot`
    embeds its prompts (`embed_texts`)."""
    config = model.config
    if not config.is_lit:
        where = f"{index.folder}: " if index is not None else ""
        raise SettingError(
            f"{where}{config.name} has no text tower, so it cannot search by text; search by "
            "example with --image PATH, or index with a LiT model"
        )
    if not text.strip():
        raise SettingError("the text query is empty")
    return np.array(embed_texts(model, [text.strip()])[0], dtype=np.float32)


def exact_top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the `k` largest dot products, best first (ties: lower row first).

    float16 rows are scored by usearch's SIMD brute force where the `ann` extra is installed
    (NumPy and MLX widen float16 element by element on the CPU, ~20x slower than the product);
    its 2k best are then re-scored in float32 here, so the answer is the exact one.
    """
    k = min(k, len(vectors))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    brute_force = _simd_brute_force() if vectors.dtype == np.float16 else None
    if brute_force is not None:
        found = brute_force(
            np.asarray(vectors),
            query.astype(np.float16),
            min(2 * k, len(vectors)),
            "ip",
            exact=True,
        )
        rows = np.asarray(found.keys, np.int64)
        scores = np.asarray(vectors[rows], np.float32) @ query.astype(np.float32)
    else:
        scores = scores_of(vectors, query)
        rows = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        scores = scores[rows]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def scores_of(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 dot product of every row with `query` (BLAS), a block of rows at a time, so a
    float16 index is never widened whole."""
    query = query.astype(np.float32)
    out = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), BLOCK):
        out[start : start + BLOCK] = np.asarray(vectors[start : start + BLOCK], np.float32) @ query
    return out


def _simd_brute_force():
    try:
        from usearch.index import search as brute_force
    except ImportError:
        return None
    return brute_force
