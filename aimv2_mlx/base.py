"""What every model of this package is: its `ModelConfig`, where it was loaded from, its kind,
and "give me image features" with one choice of pooling.

`VisionEncoder` and `LiT` derive from `Model`, so code asks the model for these instead of
testing which class it holds or patching attributes onto it from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import EncoderConfig, ModelConfig, PreprocessConfig
from .errors import SettingError

POOLS = ("mean", "tokens", "head")


@dataclass
class Location:
    """Where a checkpoint was found: a local folder or file, and what to record about it."""

    path: Path
    origin: str
    revision: str | None = None

    @property
    def folder(self) -> Path:
        """The folder holding the checkpoint (and any tokenizer or preprocessor files)."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def name(self) -> str:
        if self.origin.startswith("hf://"):
            return self.origin.removeprefix("hf://").split("/")[-1]
        return self.folder.name


def encoder_only_config(vision: EncoderConfig) -> ModelConfig:
    """The config of an encoder built from its shapes alone: the released checkpoints'
    preprocessing (the hub's `CLIPImageProcessor`) at its image size, or native resolution."""
    mode = "native" if vision.is_native else "clip"
    name = f"aimv2-encoder-patch{vision.patch_size}-{vision.image_size}"
    return ModelConfig(
        name=name, vision=vision, preprocess=PreprocessConfig.for_mode(mode, vision.image_size)
    )


class Model(nn.Module):
    """A model `load()` or `build()` returns: `config` (a `ModelConfig`), `location` (where it
    was loaded from; None when built in memory), `kind`, and `image_features()`.

    Subclasses give `__call__` (post-trunk patch tokens), `encode_image` (the pooled image
    embedding) and `image_encoder` (the `VisionEncoder` that makes the tokens).
    """

    kind: str  # said to users: "vision encoder", "LiT (image + text)"

    def __init__(self, config: ModelConfig, location: Location | None = None):
        super().__init__()
        self.config = config
        self.location = location

    def image_features(
        self, pixels: mx.array, pool: str = "mean", blocks: tuple[int, ...] | None = None
    ) -> mx.array:
        """Features of preprocessed pixels (B, H, W, 3): (B, D) for "mean" and "head", (B, N, D)
        for "tokens".

        "mean" averages the tokens (the usual AIMv2 image vector); "head" is `encode_image`: the
        attention-pool head's output, and for LiT its projected embedding (the zero-shot space).
        `blocks` (with "mean" or "tokens") takes the mean of those blocks' raw outputs in place
        of the post-trunk-normed tokens (AIMv1 style, arXiv 2401.08541).
        """
        if pool not in POOLS:
            raise SettingError(f"unknown pool {pool!r}: use {', '.join(POOLS)}")
        if pool == "head":
            return self.encode_image(pixels)
        if blocks:
            _, outputs = self.image_encoder.forward_features(pixels, feature_blocks=tuple(blocks))
            tokens = sum(outputs[1:], outputs[0]) / len(outputs)
        else:
            tokens = self(pixels)
        return tokens if pool == "tokens" else tokens.mean(axis=1)
