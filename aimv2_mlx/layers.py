"""Transformer pieces shared by the vision encoder, the LiT text tower and the decoder.

Masks are passed as one of: None (bidirectional), "causal", or an array broadcastable to
(B, heads, N, N) — boolean (True = may attend) or additive. `prefix_mask` builds the AIMv2
prefix mask: a per-image prefix of P patches attends bidirectionally, the rest causally.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cpu import kernels, on_cpu

Mask = mx.array | str | None
MIN_SPLIT_ROWS = 64  # below this many tokens (batch x sequence) the trunk runs on one stream
_fast_kernels = {"enabled": True}


def use_fast_kernels(enabled: bool) -> bool:
    """Switch the CPU float32 fast kernels on or off (process-wide); returns the previous setting.

    They have no gradients (bit-cast ops), so training switches them off and gets MLX's own
    differentiable ops; inference keeps them.
    """
    previous = _fast_kernels["enabled"]
    _fast_kernels["enabled"] = bool(enabled)
    return previous


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
    return _fast_kernels["enabled"] and x.dtype == mx.float32 and on_cpu()


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
        qkv = self.qkv(x)
        if _fast_path(x):
            return self.proj(self.attend(qkv, _additive(mask, N, x.dtype)))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, N, D))

    def attend(self, qkv: mx.array, mask: mx.array | None, kv: mx.array | None = None) -> mx.array:
        """The CPU float32 path between the projections: (B, n, 3D) -> (B, n, D).

        `mask` is additive (or None); `kv` holds the whole sequence's projections when `qkv`
        is only a block of its rows.
        """
        return kernels.qkv_attention(qkv, self.num_heads, self.scale, mask, kv)


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
    """The trunk: a stack of blocks and the post-trunk RMSNorm.

    On the CPU in float32 the rows are split over `kernels.cpu_streams()` (one MLX stream per
    core): whole images per stream when the batch divides evenly, else blocks of tokens per
    stream, which meet at each attention to share keys and values. Results equal the unsplit
    forward to float32 rounding (BLAS may sum differently for different row counts).
    """

    @classmethod
    def from_config(cls, config) -> "Transformer":
        """A trunk sized by any config with transformers-style field names (vision or text)."""
        return cls(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.intermediate_size, config.rms_norm_eps)

    def __init__(self, dims: int, depth: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.blocks = [Block(dims, num_heads, hidden, eps) for _ in range(depth)]
        self.post_trunk_norm = RMSNorm(dims, eps)

    def __call__(
        self, x: mx.array, mask: Mask = None, feature_blocks: tuple[int, ...] = ()
    ) -> tuple[mx.array, list[mx.array]]:
        """Returns the normed output and the raw outputs of the blocks in `feature_blocks`."""
        wanted = {i % len(self.blocks) for i in feature_blocks}
        plan = _split_plan(x)
        if plan:
            x, features = self._split(x, mask, wanted, *plan)
        else:
            features = []
            for i, block in enumerate(self.blocks):
                x = block(x, mask)
                if i in wanted:
                    features.append(x)
            x = self.post_trunk_norm(x)
        order = sorted(wanted)
        return x, [features[order.index(i % len(self.blocks))] for i in feature_blocks]

    def _split(self, x: mx.array, mask: Mask, wanted: set, streams: list, axis: int):
        B, N, _ = x.shape
        mask = _additive(mask, N, x.dtype)
        length = x.shape[axis]
        bounds = [(length * j // len(streams), length * (j + 1) // len(streams)) for j in range(len(streams))]
        parts = [x[a:b] if axis == 0 else x[:, a:b] for a, b in bounds]
        masks = [_mask_part(mask, axis, B, a, b) for a, b in bounds]
        features = []
        for i, block in enumerate(self.blocks):
            if axis == 0:
                for j, stream in enumerate(streams):
                    with mx.stream(stream):
                        parts[j] = block(parts[j], masks[j])
            else:
                parts = _block_over_token_blocks(block, parts, masks, streams)
            if i in wanted:
                features.append(mx.concatenate(parts, axis=axis))
        outs = []
        for stream, part in zip(streams, parts):
            with mx.stream(stream):
                outs.append(self.post_trunk_norm(part))
        return mx.concatenate(outs, axis=axis), features


def _split_plan(x: mx.array) -> tuple[list, int] | None:
    """(streams, axis) to split a (B, N, D) trunk input over, or None to run it whole.

    Whole images per stream when the batch divides evenly (axis 0, no cross-stream traffic),
    else blocks of tokens (axis 1). None off the CPU/float32 path or when too small to pay.
    """
    if not _fast_path(x) or x.shape[0] * x.shape[1] < MIN_SPLIT_ROWS:
        return None
    streams = kernels.cpu_streams()
    if len(streams) < 2:
        return None
    B, N = x.shape[0], x.shape[1]
    if B % len(streams) == 0:
        return streams, 0
    if N >= len(streams):
        return streams, 1
    return None


def _mask_part(mask: mx.array | None, axis: int, batch: int, a: int, b: int) -> mx.array | None:
    """The rows of an additive mask (broadcastable to (B, H, N, N)) that one part needs."""
    if mask is None:
        return None
    if axis == 0:
        return mask[a:b] if mask.ndim == 4 and mask.shape[0] == batch > 1 else mask
    return mask[..., a:b, :] if mask.shape[-2] > 1 else mask


def _block_over_token_blocks(block: Block, parts: list, masks: list, streams: list) -> list:
    """One block over row blocks of the sequence; every block's queries see all keys/values."""
    qkvs = []
    for stream, x in zip(streams, parts):
        with mx.stream(stream):
            qkvs.append(block.attn.qkv(block.norm_1(x)))
    outs = []
    for stream, x, qkv, mask in zip(streams, parts, qkvs, masks):
        with mx.stream(stream):
            kv = mx.concatenate(qkvs, axis=1)
            x = x + block.attn.proj(block.attn.attend(qkv, mask, kv))
            outs.append(x + block.mlp(block.norm_2(x)))
    return outs
