"""The AIMv2 pre-training decoder: one causal transformer over image tokens + caption
(apple/ml-l3m, configs/aimv2/001_aimv2_hfdata.yaml).

Sequence: [N projected encoder tokens ; start vector ; T caption tokens]. Image tokens get no
positions here (the encoder already added them); the start vector and caption tokens share a
learned (T + 1)-row position table. The pixel head reads image positions, the vocabulary head
reads the start vector and caption positions. Image tokens are causal among themselves and never
see text, so the pixel predictions do not depend on the caption.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import DecoderConfig
from .layers import Transformer


class MultimodalDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, encoder_dims: int, patch_dims: int):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.image_projector = nn.Linear(encoder_dims, d, bias=True)
        self.text_embedding = nn.Embedding(config.vocab_size, d)
        self.cls = mx.zeros((1, 1, d))
        self.text_pos_embed = mx.zeros((config.context_length + 1, d))
        self.trunk = Transformer.from_config(config)
        self.pixel_head = nn.Linear(d, patch_dims, bias=False)
        self.text_head = nn.Linear(d, config.vocab_size, bias=False)

    def __call__(
        self, image_tokens: mx.array, input_ids: mx.array | None = None
    ) -> tuple[mx.array, mx.array | None]:
        """(B, N, patch_dims) pixel predictions and (B, T + 1, V) text logits (None without text).

        Pixel output i predicts patch i + 1; text output 0 (the start vector) predicts token 0
        and output j predicts token j (the last output predicts nothing).
        """
        x = self.image_projector(image_tokens)
        n = x.shape[1]
        if input_ids is not None:
            x = mx.concatenate([x, self.text_inputs(input_ids).astype(x.dtype)], axis=1)
        h, _ = self.trunk(x, "causal")
        pixels = self.pixel_head(h[:, :n])
        logits = self.text_head(h[:, n:]) if input_ids is not None else None
        return pixels, logits

    def token_losses(self, logits: mx.array, targets: mx.array) -> mx.array:
        """Cross-entropy of each position's vocabulary logits against its target token (the CPU
        backend swaps in a faster one)."""
        return nn.losses.cross_entropy(logits, targets, reduction="none")

    def text_inputs(self, input_ids: mx.array) -> mx.array:
        """[start ; token embeddings] + the text position table: (B, T + 1, D)."""
        B, T = input_ids.shape
        start = mx.broadcast_to(self.cls, (B, 1, self.cls.shape[-1]))
        tokens = mx.concatenate([start, self.text_embedding(input_ids)], axis=1)
        return tokens + self.text_pos_embed[: T + 1]
