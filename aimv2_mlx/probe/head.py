"""The one interface every probe head has, so training, saving, scoring and loading a probe never
ask which head it is.

A head takes pooled (N, D) features or patch tokens (N, T, D), says which with `pooled`, and
gives class probabilities. It is saved as arrays (one safetensors file) plus the few settings
that rebuild it (recorded in `probe.json`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol

import numpy as np

from .settings import ProbeSettings

Split = tuple[np.ndarray, np.ndarray]  # (features, integer labels)


class ProbeHead(Protocol):
    name: ClassVar[str]  # the key in probe.json and the stem of the head's safetensors file
    pooled: ClassVar[bool]  # True: (N, D) mean-pooled features; False: (N, T, D) patch tokens

    @classmethod
    def fit(
        cls,
        train: Split,
        val: Split,
        num_classes: int,
        settings: ProbeSettings,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[ProbeHead, dict]:
        """The head chosen on `val`, and what was chosen (its sweep's validation accuracies)."""

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C); rows sum to 1."""

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """The head's arrays and the settings that rebuild it with `from_arrays`."""

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], settings: dict, num_classes: int
    ) -> ProbeHead:
        """The head `to_arrays` described."""


def head_input(head: ProbeHead | type[ProbeHead], features: np.ndarray) -> np.ndarray:
    """`features` as `head` takes them: patch tokens are mean-pooled for a pooled head."""
    return features.mean(axis=1) if head.pooled and features.ndim == 3 else features
