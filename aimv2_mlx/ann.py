"""Approximate search for collections past a million: an HNSW graph (Malkov & Yashunin,
arXiv 1603.09320) from the optional `usearch` package (`pip install 'aimv2-mlx[ann]'`).

The graph is built on the first approximate search of an index generation and saved beside its
vectors as `ann-N.usearch` (atomically; the next update drops it with the vectors it covers).
Scores are exact inner products of the candidates the graph returns.
"""

from __future__ import annotations

import numpy as np

from .folders import atomic_write
from .index import Index

CONNECTIVITY = 16  # graph degree (HNSW's M)
EXPANSION_ADD = 64  # candidates kept while inserting (efConstruction)
EXPANSION_SEARCH = 512  # candidates kept while searching (ef): recall@10 0.96 at 100 k rows


def _usearch():
    try:
        from usearch.index import Index as Graph
    except ImportError:
        raise ImportError("--ann needs the usearch package: pip install 'aimv2-mlx[ann]'") from None
    return Graph


def build_graph(vectors: np.ndarray, threads: int = 0):
    """An inner-product HNSW graph over `vectors` (row numbers as keys)."""
    Graph = _usearch()
    graph = Graph(
        ndim=vectors.shape[1],
        metric="ip",
        dtype="f16" if vectors.dtype == np.float16 else "f32",
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )
    if len(vectors):
        graph.add(
            np.arange(len(vectors), dtype=np.uint64), np.ascontiguousarray(vectors), threads=threads
        )
    return graph


def graph_of(index: Index):
    """The index's saved graph for its current generation, built and saved on first use."""
    Graph = _usearch()
    path = index.folder / f"ann-{index.generation}.usearch"
    if path.is_file():
        graph = Graph.restore(str(path), view=True)
        if graph is not None and len(graph) == len(index.vectors):
            graph.expansion_search = EXPANSION_SEARCH
            return graph
    graph = build_graph(np.asarray(index.vectors))
    atomic_write(path, lambda tmp: graph.save(str(tmp)))
    return graph


def ann_search(index: Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of about the `k` best rows, best first."""
    if not len(index.vectors):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return graph_search(graph_of(index), index.vectors, query, k)


def graph_search(
    graph, vectors: np.ndarray, query: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    matches = graph.search(query.astype(vectors.dtype), min(k, len(vectors)))
    rows = np.asarray(matches.keys, np.int64)
    scores = np.asarray(vectors[rows], np.float32) @ query.astype(np.float32)
    order = np.lexsort((rows, -scores))
    return rows[order], scores[order]
