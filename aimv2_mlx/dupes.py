"""Near-duplicate groups in an index: files whose vectors have cosine similarity ≥ a threshold.

Pairs are found block by block (a block of rows against all rows: memory stays bounded), then
joined into groups by union-find, so A~B and B~C put A, B and C in one group.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import SettingError
from .index import Index, open_index
from .search import BLOCK, Result, scores_of

DEFAULT_THRESHOLD = 0.95
PAIR_BLOCK = 1024  # query rows per block of the pairwise scan


def find_duplicates(
    index: str | os.PathLike | Index, threshold: float = DEFAULT_THRESHOLD
) -> list[list[Result]]:
    """Groups of two or more near-duplicates, largest first (ties: by first path). In a group the
    first file is the one with the lowest row, and each score is the similarity to it."""
    if not -1.0 <= threshold <= 1.0:
        raise SettingError(f"--threshold {threshold}: a cosine similarity, between -1 and 1")
    index = index if isinstance(index, Index) else open_index(index)
    vectors = index.vectors
    parent = np.arange(len(vectors))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(vectors), PAIR_BLOCK):
        block = np.asarray(vectors[start : start + PAIR_BLOCK], np.float32)
        similar = _similar_pairs(vectors, block, start, threshold)
        for a, b in similar:
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(len(vectors)):
        groups.setdefault(root(i), []).append(i)
    found = []
    for rows in (g for g in groups.values() if len(g) > 1):
        scores = scores_of(vectors[rows], np.asarray(vectors[rows[0]], np.float32))
        found.append(
            [Result(index.paths[r], float(s), r) for r, s in zip(rows, scores, strict=True)]
        )
    return sorted(found, key=lambda g: (-len(g), g[0].path))


def _similar_pairs(
    vectors: np.ndarray, block: np.ndarray, start: int, threshold: float
) -> list[tuple[int, int]]:
    """(i, j) with i in the block, j > i anywhere, and similarity ≥ threshold."""
    pairs = []
    for other in range(start, len(vectors), BLOCK):
        right = np.asarray(vectors[other : other + BLOCK], np.float32)
        i, j = np.nonzero(block @ right.T >= threshold)
        i, j = i + start, j + other
        keep = j > i
        pairs += zip(i[keep].tolist(), j[keep].tolist(), strict=True)
    return pairs
