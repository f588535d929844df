"""What the decoder makes of a few images: predicted patches (de-normalised into a picture)
and greedy captions, for the periodic reconstruction grid."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..objective import patchify, unpatchify


def greedy_captions(model, tokens: mx.array, context_length: int, eos_id: int) -> np.ndarray:
    """(B, T) ids decoded one position at a time (outputs j only see tokens < j)."""
    ids = np.full((tokens.shape[0], context_length), eos_id, dtype=np.int32)
    for j in range(context_length):
        _, logits = model.decoder(tokens, mx.array(ids))
        ids[:, j] = np.array(mx.argmax(logits[:, j], axis=-1))
    return ids


def reconstruct(
    model, pixels: mx.array, objective: str, mean, std
) -> tuple[np.ndarray, np.ndarray, mx.array]:
    """(real uint8, predicted uint8, encoder tokens). Prefix P = 1, so patches 1..N−1 are predicted;
    each predicted patch gets the real patch's mean and spread back (the targets were normalised
    per patch), patch 0 is copied from the real image."""
    p = model.encoder.config.vision.patch_size
    B, H, W, _ = pixels.shape
    prefix = None if objective == "caption" else mx.ones((B,), dtype=mx.int32)
    tokens = model.encoder(pixels, prefix_lengths=prefix)
    predicted, _ = model.decoder(tokens)
    real = patchify(pixels, p).astype(mx.float32)
    mu = real.mean(axis=-1, keepdims=True)
    sigma = mx.sqrt(mx.var(real, axis=-1, keepdims=True, ddof=1) + 1e-6)
    guess = mx.concatenate(
        [real[:, :1], predicted[:, :-1].astype(mx.float32) * sigma[:, 1:] + mu[:, 1:]], axis=1
    )
    image = unpatchify(guess, p, (H // p, W // p))

    def to_uint8(x):
        x = np.array(x) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)

    return to_uint8(pixels), to_uint8(image), tokens
