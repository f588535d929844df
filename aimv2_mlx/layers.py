"""Transformer pieces shared by the vision encoder, the LiT text tower and the decoder.

Plain MLX that runs on every device: `mx.fast` attention and RMSNorm, `nn.silu`. On the CPU,
`aimv2_mlx.cpu.apply` swaps in subclasses with vectorised float32 kernels and a trunk that
uses every core (see `cpu.modules`); these classes stay the reference they are tested against.

Masks are passed as one of: None (bidirectional), "causal", or an array broadcastable to
(B, heads, N, N) — boolean (True = may attend) or additive. `prefix_mask` builds the AIMv2
prefix mask: a per-image prefix of P patches attends bidirectionally, the rest causally.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .errors import SettingError

Mask = mx.array | str | None


def prefix_mask(prefix_lengths: mx.array, num_tokens: int) -> mx.array:
    """Boolean (B, 1, N, N) mask: query q may see key k iff k <= q or k < P[b]."""
    idx = mx.arange(num_tokens)
    causal = idx[None, :] <= idx[:, None]
    in_prefix = idx[None, None, :] < prefix_lengths.reshape(-1, 1, 1)
    return (causal[None] | in_prefix)[:, None]


def block_indices(feature_blocks: tuple[int, ...], depth: int) -> list[int]:
    """Block indices with negative ones counted from the end, as Python indexes a list of `depth`.

    An index outside -depth..depth-1 is refused rather than wrapped: block 17 of a 4-block model
    is a mistake, not block 1.
    """
    wanted = []
    for i in feature_blocks:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise SettingError(
                f"block {i!r} is not a block number: give integers such as 0, 3 or -1"
            )
        if not -depth <= i < depth:
            raise SettingError(
                f"block {i!r} is out of range: the model has {depth} blocks "
                f"(use 0..{depth - 1}, or -{depth}..-1 from the end)"
            )
        wanted.append(int(i) % depth)
    return wanted


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
        q, k, v = (
            self.qkv(x)
            .reshape(B, N, 3, self.num_heads, D // self.num_heads)
            .transpose(2, 0, 3, 1, 4)
        )
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
        return self.fc2(nn.silu(self.fc1(x)) * self.fc3(x))


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

    @classmethod
    def from_config(cls, config) -> Transformer:
        """A trunk sized by any config with transformers-style field names (vision or text)."""
        return cls(
            config.hidden_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.intermediate_size,
            config.rms_norm_eps,
        )

    def __init__(self, dims: int, depth: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.blocks = [Block(dims, num_heads, hidden, eps) for _ in range(depth)]
        self.post_trunk_norm = RMSNorm(dims, eps)

    def __call__(
        self, x: mx.array, mask: Mask = None, feature_blocks: tuple[int, ...] = ()
    ) -> tuple[mx.array, list[mx.array]]:
        """Returns the normed output and the raw outputs of the blocks in `feature_blocks`."""
        wanted = block_indices(feature_blocks, len(self.blocks))
        outputs = {}
        for i, block in enumerate(self.blocks):
            x = block(x, mask)
            if i in wanted:
                outputs[i] = x
        return self.post_trunk_norm(x), [outputs[i] for i in wanted]
