"""Transformer pieces shared by the vision encoder, the LiT text tower and the decoder.

Masks are passed as one of: None (bidirectional), "causal", or an array broadcastable to
(B, heads, N, N) — boolean (True = may attend) or additive. `prefix_mask` builds the AIMv2
prefix mask: a per-image prefix of P patches attends bidirectionally, the rest causally.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .backend import on_cpu

Mask = mx.array | str | None


def prefix_mask(prefix_lengths: mx.array, num_tokens: int) -> mx.array:
    """Boolean (B, 1, N, N) mask: query q may see key k iff k <= q or k < P[b]."""
    idx = mx.arange(num_tokens)
    causal = idx[None, :] <= idx[:, None]
    in_prefix = idx[None, None, :] < prefix_lengths.reshape(-1, 1, 1)
    return (causal[None] | in_prefix)[:, None]


def _additive(mask: Mask, n: int, dtype) -> mx.array | None:
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        idx = mx.arange(n)
        mask = idx[None, :] <= idx[:, None]
    if mask.dtype == mx.bool_:
        return mx.where(mask, mx.array(0.0, dtype), mx.array(-math.inf, dtype))
    return mask.astype(dtype)


def _fast_path(x: mx.array) -> bool:
    return x.dtype == mx.float32 and on_cpu()


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and no biases."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.qkv = nn.Linear(dims, 3 * dims, bias=False)
        self.proj = nn.Linear(dims, dims, bias=False)

    def __call__(self, x: mx.array, mask: Mask = None) -> mx.array:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        if _fast_path(x):
            out = kernels.attention(q, k, v, self.scale, _additive(mask, N, x.dtype))
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, N, D))


class SwiGLU(nn.Module):
    """fc2(silu(fc1 x) * fc3 x), the AIMv2 MLP (fc1 = gate, fc3 = up, fc2 = down)."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dims, bias=False)
        self.fc3 = nn.Linear(dims, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.fc1(x), self.fc3(x)
        hidden = kernels.silu_mul(gate, up) if _fast_path(x) else nn.silu(gate) * up
        return self.fc2(hidden)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm_1 x), then x + mlp(norm_2 x)."""

    def __init__(self, dims: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm_1 = RMSNorm(dims, eps)
        self.attn = Attention(dims, num_heads)
        self.norm_2 = RMSNorm(dims, eps)
        self.mlp = SwiGLU(dims, hidden)

    def __call__(self, x: mx.array, mask: Mask = None) -> mx.array:
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class Transformer(nn.Module):
    """The trunk: a stack of blocks and the post-trunk RMSNorm."""

    def __init__(self, dims: int, depth: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.blocks = [Block(dims, num_heads, hidden, eps) for _ in range(depth)]
        self.post_trunk_norm = RMSNorm(dims, eps)

    def __call__(
        self, x: mx.array, mask: Mask = None, feature_blocks: tuple[int, ...] = ()
    ) -> tuple[mx.array, list[mx.array]]:
        """Returns the normed output and the raw outputs of the blocks in `feature_blocks`."""
        wanted = {i % len(self.blocks) for i in feature_blocks}
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x, mask)
            if i in wanted:
                features.append(x)
        order = sorted(wanted)
        features = [features[order.index(i % len(self.blocks))] for i in feature_blocks]
        return self.post_trunk_norm(x), features
