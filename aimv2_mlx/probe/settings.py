"""What a probe run decides: the heads, the splits, the features and each head's sweep."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .attentive import AttentiveSettings
from .knn import DEFAULT_KS
from .linear import DEFAULT_C_GRID


@dataclass
class ProbeSettings:
    heads: tuple[str, ...] = ("linear", "knn")
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # only when no test set is given
    seed: int = 0
    normalize: bool = True  # L2-normalise pooled features for the linear head
    # None: post-trunk-normed tokens; else mean of these blocks
    blocks: tuple[int, ...] | None = None
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    ks: tuple[int, ...] = DEFAULT_KS
    attentive: AttentiveSettings = field(default_factory=AttentiveSettings)
    batch_size: int = 8
    workers: int = 0
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self):
        """Paths as a person gives them (str, `~`) and blocks as any sequence, in one form."""
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir).expanduser()
        if self.blocks is not None:
            self.blocks = tuple(self.blocks)
