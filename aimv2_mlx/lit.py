"""The LiT model (aimv2-large-patch14-224-lit): image tower + causal text tower for zero-shot."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .base import Location, Model
from .config import ModelConfig, TextConfig
from .encoder import VisionEncoder
from .layers import Transformer
from .vectors import l2_normalize


class TextPreprocessor(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.text_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positional_embedding = mx.zeros((config.max_position_embeddings, config.hidden_size))

    def __call__(self, input_ids: mx.array) -> mx.array:
        n = input_ids.shape[1]
        return self.text_embedding(input_ids) + self.positional_embedding[:n]


class TextEncoder(nn.Module):
    """Causal text transformer pooled at the first EOS token: `eos_token_id`, the tokenizer's end
    token (CLIP's <|endoftext|>, or e.g. SigLIP's </s>), as transformers' `Aimv2TextModel`."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.preprocessor = TextPreprocessor(config)
        self.trunk = Transformer.from_config(config)

    def __call__(self, input_ids: mx.array) -> mx.array:
        input_ids = input_ids[:, : self.config.max_position_embeddings]
        tokens, _ = self.trunk(self.preprocessor(input_ids), "causal")
        eos = mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=1)
        return mx.take_along_axis(tokens, eos[:, None, None], axis=1)[:, 0]


class LiT(Model):
    """CLIP-style two-tower model; `model(pixels)` returns image tokens like any encoder."""

    kind = "LiT (image + text)"

    def __init__(self, config: ModelConfig, location: Location | None = None):
        super().__init__(config, location)
        vision, text, dim = config.vision, config.text, config.projection_dim
        self.image_encoder = VisionEncoder(vision)
        self.text_encoder = TextEncoder(text)
        self.image_projector = nn.Linear(vision.hidden_size, dim, bias=False)
        self.text_projector = nn.Linear(text.hidden_size, dim, bias=False)
        self.log_logit_scale = mx.array(math.log(1 / 0.07))

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.image_encoder(pixels)

    def forward_features(self, pixels: mx.array, feature_blocks: tuple[int, ...] = ()):
        """The image encoder's tokens and chosen blocks, as `VisionEncoder.forward_features`."""
        return self.image_encoder.forward_features(pixels, feature_blocks)

    def embed(self, pixels: mx.array) -> mx.array:
        """The image encoder's mean-pooled embedding (B, D), as `VisionEncoder.embed`."""
        return self.image_encoder.embed(pixels)

    def encode_image(self, pixels: mx.array) -> mx.array:
        """Projected image embedding (B, projection_dim), not normalised."""
        return self.encode_image_tokens(self.image_encoder(pixels))

    def encode_image_tokens(self, tokens: mx.array) -> mx.array:
        """`encode_image` from the encoder's tokens (B, N, D): attention pool, then projection."""
        return self.image_projector(self.image_encoder.head(tokens))

    def encode_text(self, input_ids: mx.array) -> mx.array:
        """Projected text embedding (B, projection_dim), not normalised."""
        return self.text_projector(self.text_encoder(input_ids))

    def logit_scale(self) -> mx.array:
        return mx.exp(mx.clip(self.log_logit_scale, 0.0, math.log(self.config.max_logit_scale)))

    def logits(self, pixels: mx.array, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        """Zero-shot logits: (logits_per_image (B_img, B_txt), logits_per_text)."""
        image = l2_normalize(self.encode_image(pixels))
        text = l2_normalize(self.encode_text(input_ids))
        per_text = self.logit_scale() * text @ image.T
        return per_text.T, per_text
