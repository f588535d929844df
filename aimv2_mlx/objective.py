"""The AIMv2 objective: prefix-masked encoder, shifted pixel targets, next-token text
(arXiv 2411.14402 §2; apple/ml-l3m, configs/aimv2/001_aimv2_hfdata.yaml).

L = pixel_weight · L_pixel + text_weight · L_text (0.4 and 1.0), where

* L_pixel: decoder output i predicts patch i + 1 of the *normalised* input image, each patch
  normalised over its own values (unbiased variance + 1e-6); a target counts only if its index
  is ≥ the image's prefix length P; per-patch MSE, then a patch-weighted mean over the batch.
* L_text: the start vector's output predicts token 0, token j − 1's output predicts token j;
  cross-entropy in float32, averaged over targets that are not ignored (pad / EOS).

Each loss is a sum divided by a count. The counts depend only on the prefix lengths and the
token ids, so they can be taken over a whole (accumulated or multi-host) batch before the
forward pass; `loss_sums` returns the sums so a step can divide by those global counts, which
makes accumulation and data parallelism exact rather than a mean of means.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import SettingError

OBJECTIVES = ("multimodal", "image", "caption")


@dataclass(frozen=True)
class LossWeights:
    pixel: float = 0.4
    text: float = 1.0


def sample_prefix_lengths(rng: np.random.Generator, batch: int, num_patches: int) -> np.ndarray:
    """P per image, uniform on {1, …, N − 1}: the prefix is patches 0..P − 1."""
    return rng.integers(1, num_patches, size=batch).astype(np.int32)


def patchify(pixels: mx.array, patch_size: int) -> mx.array:
    """(B, H, W, C) -> (B, N, p·p·C) in raster order; inside a patch (row·p + col)·C + channel."""
    B, H, W, C = pixels.shape
    p = patch_size
    x = pixels.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(
    patches: mx.array, patch_size: int, grid: tuple[int, int], channels: int = 3
) -> mx.array:
    """Inverse of `patchify`: (B, N, p·p·C) -> (B, H, W, C)."""
    B = patches.shape[0]
    gh, gw = grid
    p = patch_size
    x = patches.reshape(B, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, gh * p, gw * p, channels)


def normalize_patches(patches: mx.array, eps: float = 1e-6) -> mx.array:
    """Each patch over its own values: (x − mean) / sqrt(unbiased var + eps), in float32."""
    x = patches.astype(mx.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = mx.var(x, axis=-1, keepdims=True, ddof=1)
    return (x - mean) / mx.sqrt(var + eps)


def pixel_targets(pixels: mx.array, patch_size: int) -> mx.array:
    """The pixel targets of a batch of normalised images: per-patch normalised patches."""
    return normalize_patches(patchify(pixels, patch_size))


def target_patch_mask(prefix_lengths: mx.array, num_patches: int) -> mx.array:
    """(B, N − 1) float mask over the shifted targets 1..N − 1: 1 where the index is ≥ P."""
    idx = mx.arange(1, num_patches)
    return (idx[None, :] >= prefix_lengths[:, None]).astype(mx.float32)


def pixel_loss_sum(predictions: mx.array, targets: mx.array, prefix_lengths: mx.array) -> mx.array:
    """Σ over counted patches of the per-patch MSE (output i against patch i + 1)."""
    pred = predictions[:, :-1].astype(mx.float32)
    mse = mx.square(pred - targets[:, 1:]).mean(axis=-1)
    return (mse * target_patch_mask(prefix_lengths, targets.shape[1])).sum()


def pixel_count(prefix_lengths, num_patches: int) -> int:
    """How many target patches count: Σ (N − P) over images."""
    return int(np.sum(num_patches - np.asarray(prefix_lengths, dtype=np.int64)))


def text_loss_sum(
    logits: mx.array, input_ids: mx.array, ignore_ids: tuple[int, ...], token_losses=None
) -> mx.array:
    """Σ over non-ignored tokens of the cross-entropy; logits (B, T + 1, V), the last dropped.

    `token_losses(logits, targets)`: the per-position cross-entropy (default MLX's; a decoder
    passes its own)."""
    if token_losses is None:
        token_losses = partial(nn.losses.cross_entropy, reduction="none")
    ce = token_losses(logits[:, :-1].astype(mx.float32), input_ids)
    return (ce * text_target_mask(input_ids, ignore_ids)).sum()


def text_target_mask(input_ids: mx.array, ignore_ids: tuple[int, ...]) -> mx.array:
    keep = mx.ones(input_ids.shape, dtype=mx.bool_)
    for token in ignore_ids:
        keep = keep & (input_ids != token)
    return keep.astype(mx.float32)


def text_count(input_ids, ignore_ids: tuple[int, ...]) -> int:
    ids = np.asarray(input_ids)
    return int((~np.isin(ids, np.asarray(ignore_ids))).sum())


def loss_sums(
    encoder,
    decoder,
    pixels: mx.array,
    input_ids: mx.array,
    prefix_lengths: mx.array,
    objective: str,
    ignore_ids: tuple[int, ...],
) -> tuple[mx.array, mx.array]:
    """(pixel loss sum, text loss sum) of one batch; the unused one is 0 for single objectives.

    "multimodal" and "image" run the encoder with the prefix mask; "caption" (the paper's
    captioning-only ablation) has no pixel targets, so its encoder attends bidirectionally.
    "image" runs the decoder on the image tokens alone (their outputs cannot see text anyway).
    """
    if objective not in OBJECTIVES:
        raise SettingError(f"unknown objective {objective!r}: use {', '.join(OBJECTIVES)}")
    tokens = encoder(pixels, prefix_lengths=None if objective == "caption" else prefix_lengths)
    predicted, logits = decoder(tokens, None if objective == "image" else input_ids)
    zero = mx.array(0.0, dtype=mx.float32)
    pixel = zero
    if objective != "caption":
        pixel = pixel_loss_sum(
            predicted, pixel_targets(pixels, encoder.config.vision.patch_size), prefix_lengths
        )
    if objective == "image":
        return pixel, zero
    return pixel, text_loss_sum(logits, input_ids, ignore_ids, decoder.token_losses)


def combine(
    pixel_sum: mx.array, text_sum: mx.array, pixel_n, text_n, weights: LossWeights
) -> tuple[mx.array, mx.array, mx.array]:
    """(total, L_pixel, L_text) from sums and counts (ints or arrays); a zero count gives 0."""
    l_pixel = pixel_sum / mx.maximum(mx.array(pixel_n, dtype=mx.float32), 1.0)
    l_text = text_sum / mx.maximum(mx.array(text_n, dtype=mx.float32), 1.0)
    return weights.pixel * l_pixel + weights.text * l_text, l_pixel, l_text


def used_weights(objective: str, weights: LossWeights) -> LossWeights:
    """The objective's weights: a single-loss objective drops the other term."""
    if objective == "image":
        return LossWeights(weights.pixel, 0.0)
    if objective == "caption":
        return LossWeights(0.0, weights.text)
    return weights
