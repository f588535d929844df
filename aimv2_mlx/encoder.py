"""The AIMv2 vision encoder: patchifier, positions, trunk with prefix attention, optional head."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .base import Location, Model, encoder_only_config
from .config import EncoderConfig, ModelConfig
from .layers import Mask, RMSNorm, Transformer, prefix_mask


@lru_cache(maxsize=16)
def sincos_positions(grid_h: int, grid_w: int, dims: int) -> np.ndarray:
    """2-D sin-cos table (grid_h*grid_w, dims), laid out [sin_w | cos_w | sin_h | cos_h]."""
    quarter = dims // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    h, w = np.meshgrid(
        np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
    )
    emb_h = h.reshape(-1, 1) * omega
    emb_w = w.reshape(-1, 1) * omega
    table = np.concatenate([np.sin(emb_w), np.cos(emb_w), np.sin(emb_h), np.cos(emb_h)], axis=1)
    return table.astype(np.float32)


class Patchifier(nn.Module):
    """Patch projection (a stride-p convolution done as one matmul) and its RMSNorm."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_size = p
        self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p, bias=True)
        self.norm = RMSNorm(d, config.rms_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        B, H, W, C = pixels.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        patches = pixels.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(B, (H // p) * (W // p), p * p * C)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        x = mx.addmm(self.proj.bias, patches, weight.T)
        return self.norm(x)


class Preprocessor(nn.Module):
    """Patch tokens plus positions: a learned table, or 2-D sin-cos for the native model."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.patchifier = Patchifier(config)
        if not config.is_native:
            self.pos_embed = mx.zeros((1, config.num_patches, config.hidden_size))

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patchifier(pixels)
        if self.config.is_native:
            p = self.config.patch_size
            grid = (pixels.shape[1] // p, pixels.shape[2] // p, self.config.hidden_size)
            return x + mx.array(sincos_positions(*grid)).astype(x.dtype)
        if x.shape[1] != self.pos_embed.shape[1]:
            size = self.config.image_size
            raise ValueError(
                f"this model takes {size}x{size} images; got {pixels.shape[1]}x{pixels.shape[2]}"
            )
        return x + self.pos_embed


class AttentionPoolHead(nn.Module):
    """AIM attention pooling: one learned query attends over the tokens, then a linear layer."""

    def __init__(self, dims: int, num_heads: int, out_dims: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.cls_token = mx.zeros((1, 1, dims))
        self.k = nn.Linear(dims, dims, bias=False)
        self.v = nn.Linear(dims, dims, bias=False)
        self.linear = nn.Linear(dims, out_dims or dims, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        B, N, D = x.shape
        h, d = self.num_heads, D // self.num_heads
        q = mx.broadcast_to(self.cls_token, (B, self.cls_token.shape[1], D))
        q = q.reshape(B, -1, h, d).transpose(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, h, d).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, h, d).transpose(0, 2, 1, 3)
        out = self.attend(q, k, v, d**-0.5).transpose(0, 2, 1, 3).reshape(B, -1, D).mean(axis=1)
        return self.linear(out)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


class VisionEncoder(Model):
    """AIMv2 image encoder. `model(pixels)` maps (B, H, W, 3) pixels to (B, N, D) tokens.

    Built from a full `ModelConfig` (what `load()` does) or from an `EncoderConfig` alone, which
    gets the released checkpoints' preprocessing (`encoder_only_config`).
    """

    kind = "vision encoder"

    def __init__(self, config: EncoderConfig | ModelConfig, location: Location | None = None):
        if isinstance(config, EncoderConfig):
            config = encoder_only_config(config)
        super().__init__(config, location)
        vision = self.config.vision
        self.preprocessor = Preprocessor(vision)
        self.trunk = Transformer.from_config(vision)
        if vision.use_head:
            self.head = AttentionPoolHead(vision.hidden_size, vision.num_attention_heads)

    @property
    def image_encoder(self) -> VisionEncoder:
        """The tower that makes the image tokens: this model itself."""
        return self

    def __call__(self, pixels: mx.array, prefix_lengths: mx.array | None = None) -> mx.array:
        """Post-trunk-normed patch tokens. `prefix_lengths` (B,) switches on prefix attention."""
        tokens, _ = self.forward_features(pixels, prefix_lengths=prefix_lengths)
        return tokens

    def forward_features(
        self,
        pixels: mx.array,
        feature_blocks: tuple[int, ...] = (),
        prefix_lengths: mx.array | None = None,
    ) -> tuple[mx.array, list[mx.array]]:
        """Tokens plus the raw outputs of the chosen blocks (negative indices count from the
        end).
        """
        x = self.preprocessor(pixels.astype(self.preprocessor.patchifier.proj.weight.dtype))
        mask: Mask = None if prefix_lengths is None else prefix_mask(prefix_lengths, x.shape[1])
        return self.trunk(x, mask, tuple(feature_blocks))

    def embed(self, pixels: mx.array) -> mx.array:
        """Mean-pooled embedding (B, D): the usual AIMv2 image vector."""
        return self.image_features(pixels, "mean")

    def encode_image(self, pixels: mx.array) -> mx.array:
        """The attention-pool head's output (B, D); only for models that carry a head."""
        if "head" not in self:
            raise ValueError("this model has no attention-pooling head; use mean pooling")
        return self.head(self(pixels))
