"""kNN probe: cosine similarity, the k nearest training features vote with weight exp(sim / T).

T = 0.07 as in DINO-style kNN evaluation. Similarities are computed in MLX in row chunks, so the
(N_test, N_train) matrix never exists at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import numpy as np

from ..vectors import l2_normalize

DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


@dataclass
class KnnHead:
    features: np.ndarray  # L2-normalised training features (N, D)
    labels: np.ndarray  # (N,)
    num_classes: int
    k: int
    temperature: float = TEMPERATURE
    name: ClassVar[str] = "knn"
    pooled: ClassVar[bool] = True

    def scores(self, features: np.ndarray, chunk: int = 512) -> np.ndarray:
        """Per class, the summed vote weights of the k nearest neighbours (N, C)."""
        bank = mx.array(l2_normalize(self.features).astype(np.float32))
        labels = mx.array(self.labels.astype(np.int32))
        queries = l2_normalize(features).astype(np.float32)
        k = min(self.k, len(self.labels))
        out = []
        for start in range(0, len(queries), chunk):
            sims = mx.array(queries[start : start + chunk]) @ bank.T
            nearest = mx.argpartition(-sims, k - 1, axis=1)[:, :k]
            weights = mx.exp((mx.take_along_axis(sims, nearest, axis=1) - 1.0) / self.temperature)
            votes = mx.zeros((sims.shape[0], self.num_classes))
            rows = mx.broadcast_to(mx.arange(sims.shape[0])[:, None], nearest.shape)
            votes = votes.at[rows, labels[nearest]].add(weights)
            out.append(np.array(votes))
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The votes as fractions of each row's total vote."""
        votes = self.scores(features)
        return votes / np.maximum(votes.sum(1, keepdims=True), 1e-30)

    @classmethod
    def fit(cls, train, val, num_classes: int, settings, progress=None) -> tuple[KnnHead, dict]:
        return train_knn(train, val, num_classes, settings.ks, progress)

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"features": self.features, "labels": self.labels.astype(np.int32)}
        return arrays, {"k": self.k, "temperature": self.temperature}

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], settings: dict, num_classes: int
    ) -> KnnHead:
        return cls(
            arrays["features"],
            arrays["labels"],
            num_classes,
            settings["k"],
            settings["temperature"],
        )


def train_knn(train, val, num_classes: int, ks=DEFAULT_KS, progress=None) -> tuple[KnnHead, dict]:
    """The k with the best validation accuracy, over train + validation as the memory bank;
    `progress(done, total)` after each k."""
    accuracy = {}
    for done, k in enumerate(ks, start=1):
        head = KnnHead(train[0], train[1], num_classes, k)
        accuracy[k] = float((head.scores(val[0]).argmax(1) == val[1]).mean())
        if progress:
            progress(done, len(ks))
    best = max(accuracy, key=lambda k: (accuracy[k], -k))
    bank = KnnHead(
        np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]), num_classes, best
    )
    return bank, {"k": best, "val_accuracy_by_k": {str(k): a for k, a in accuracy.items()}}
