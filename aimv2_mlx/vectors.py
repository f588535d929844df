"""Unit vectors and probabilities: the arithmetic that embeddings, LiT, zero-shot, the probes and
the converter's check share, defined once."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

_TINY = 1e-12  # sklearn.preprocessing.normalize's floor: an all-zero row stays zero, not NaN


def l2_normalize(x):
    """Unit vectors along the last axis of an MLX or NumPy array (CLIP's embedding space,
    arXiv 2103.00020 fig. 3), in the array's own library and dtype."""
    if isinstance(x, mx.array):
        return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), _TINY)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _TINY)


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 probabilities along the last axis, computed in float64 after subtracting the max."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
