"""Shared fixtures. References (torch, transformers) are imported lazily, per test."""

from __future__ import annotations

import numpy as np
import pytest

import aimv2_mlx  # noqa: F401  (OpenBLAS before MLX)
from aimv2_mlx.config import EncoderConfig, ModelConfig, PreprocessConfig


def tiny_config(native: bool = False, head: bool = False, depth: int = 2) -> ModelConfig:
    """A small encoder config for logic tests (2 blocks, 64 wide, 2 heads)."""
    return ModelConfig(
        name="tiny-test",
        vision=EncoderConfig(hidden_size=64, num_hidden_layers=depth, num_attention_heads=2,
                             intermediate_size=128, image_size=56, is_native=native, use_head=head),
        preprocess=PreprocessConfig.for_mode("native" if native else "clip", 56),
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def transformers_reference():
    """transformers + torch, or a skip that says why."""
    pytest.importorskip("torch", reason="parity tests need the test extra: pip install -e '.[test]'")
    return pytest.importorskip("transformers", reason="parity tests need transformers>=5 (test extra)")
