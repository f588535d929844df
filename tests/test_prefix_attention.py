"""Prefix attention against a hand-built NumPy encoder with an explicit mask matrix."""

from __future__ import annotations

import aimv2_mlx
from aimv2_mlx.layers import prefix_mask

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .conftest import tiny_config


def _rms(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _reference_forward(
    params: dict, pixels: np.ndarray, prefix: list[int] | None, heads: int
) -> np.ndarray:
    """The encoder written out in NumPy float64: patchify, blocks with plain softmax attention."""
    p = params
    B, H, W, C = pixels.shape
    w = p["preprocessor.patchifier.proj.weight"]
    size = w.shape[1]
    patches = pixels.reshape(B, H // size, size, W // size, size, C).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(B, -1, size * size * C) @ w.reshape(w.shape[0], -1).T
    x = _rms(x + p["preprocessor.patchifier.proj.bias"], p["preprocessor.patchifier.norm.weight"])
    x = x + p["preprocessor.pos_embed"]
    N, D = x.shape[1:]
    allowed = np.ones((B, N, N), bool)
    if prefix is not None:
        for b, length in enumerate(prefix):
            for q in range(N):
                for k in range(N):
                    allowed[b, q, k] = k <= q or k < length
    depth = len({k.split(".")[2] for k in p if k.startswith("trunk.blocks.")})
    for i in range(depth):
        blk = {
            k.split(f"trunk.blocks.{i}.")[1]: v
            for k, v in p.items()
            if k.startswith(f"trunk.blocks.{i}.")
        }
        h = _rms(x, blk["norm_1.weight"])
        q, k, v = np.split(h @ blk["attn.qkv.weight"].T, 3, axis=-1)
        split = lambda t: t.reshape(B, N, heads, D // heads).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // heads)
        scores = np.where(allowed[:, None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(B, N, D)
        x = x + out @ blk["attn.proj.weight"].T
        h = _rms(x, blk["norm_2.weight"])
        gate, up = h @ blk["mlp.fc1.weight"].T, h @ blk["mlp.fc3.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ blk["mlp.fc2.weight"].T
    return _rms(x, p["trunk.post_trunk_norm.weight"])


def _model_and_params():
    mx.random.seed(1)
    model = aimv2_mlx.build(tiny_config())
    model.preprocessor.pos_embed = 0.02 * mx.random.normal(model.preprocessor.pos_embed.shape)
    for block in model.trunk.blocks:  # non-trivial norm weights, so a wrong norm shows
        block.norm_1.weight = 1 + 0.1 * mx.random.normal(block.norm_1.weight.shape)
    params = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.parameters())}
    return model, params


def test_prefix_forward_matches_numpy_reference(rng):
    model, params = _model_and_params()
    pixels = rng.standard_normal((3, 56, 56, 3)).astype(np.float32)
    prefix = [1, 7, 15]
    ours = np.array(model(mx.array(pixels), prefix_lengths=mx.array(prefix)))
    expected = _reference_forward(params, pixels.astype(np.float64), prefix, heads=2)
    assert np.abs(ours - expected).max() <= 1e-5


def test_no_prefix_is_bidirectional(rng):
    model, params = _model_and_params()
    pixels = rng.standard_normal((2, 56, 56, 3)).astype(np.float32)
    ours = np.array(model(mx.array(pixels)))
    assert (
        np.abs(ours - _reference_forward(params, pixels.astype(np.float64), None, heads=2)).max()
        <= 1e-5
    )
    # A prefix covering every patch is the same as no mask; a shorter one is not.
    full = np.array(model(mx.array(pixels), prefix_lengths=mx.array([16, 16])))
    assert np.abs(full - ours).max() <= 1e-6
    short = np.array(model(mx.array(pixels), prefix_lengths=mx.array([4, 4])))
    assert np.abs(short - ours).max() > 1e-3


def test_prefix_mask_matrix():
    mask = np.array(prefix_mask(mx.array([2, 4]), 5))
    assert mask.shape == (2, 1, 5, 5)
    expected = np.tril(np.ones((5, 5), bool))
    expected[:, :2] = True
    assert (mask[0, 0] == expected).all()
    expected[:, :4] = True
    assert (mask[1, 0] == expected).all()
