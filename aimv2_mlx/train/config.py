"""What a pre-training run is: model sizes, objective, optimisation and data settings.

Presets set the encoder (tiny/small/base/large; large is AIMv2-L) and scale the decoder with it
(same width, half the depth: AIMv2-L gets the recipe's 12-block decoder). Optimisation defaults
are the recipe's (apple/ml-l3m, configs/aimv2/001_aimv2_hfdata.yaml) except the step counts,
which a laptop run chooses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import IMAGENET_MEAN, IMAGENET_STD, DecoderConfig, EncoderConfig, _build, check_tower


@dataclass(frozen=True)
class EncoderSize:
    """What a `--preset` fixes: the encoder's width, depth, heads, SwiGLU hidden size, image size."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int


SIZES = {
    "tiny": EncoderSize(128, 4, 2, 384, 112),
    "small": EncoderSize(384, 12, 3, 1024, 224),
    "base": EncoderSize(768, 12, 6, 2048, 224),
    "large": EncoderSize(1024, 24, 8, 2816, 224),
}

# What a resumed run may change: its length (the schedule follows it) and when it logs, samples
# and saves; everything else would make the run a different one.
RESUMABLE = ("steps", "checkpoint_every", "checkpoint_minutes", "log_every", "sample_every")


@dataclass
class PretrainConfig:
    preset: str = "tiny"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    objective: str = "multimodal"  # multimodal | image | caption
    pixel_weight: float = 0.4
    text_weight: float = 1.0
    batch_size: int = 32  # per rank and micro-batch
    accumulation: int = 1
    steps: int = 1000
    warmup_steps: int = 100
    peak_lr: float = 1e-3
    start_lr: float = 1e-6
    end_lr: float = 1e-5
    weight_decay: float = 0.1  # MLX/PyTorch AdamW semantics: p *= 1 - lr·wd
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "float32"  # float32 | bfloat16 (compute; master weights, norms' statistics, losses fp32)
    compile: bool = True
    seed: int = 0
    crop_scale: tuple[float, float] = (0.4, 1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Every 100 steps: below the README's 250-step example run, so an interrupted or crashed
    # laptop run keeps its progress; `checkpoint_minutes` bounds the loss for slow, large runs.
    checkpoint_every: int = 100
    checkpoint_minutes: float = 10.0  # also save when this long has passed since the last save (0: off)
    log_every: int = 10
    sample_every: int = 0  # reconstruction grid + greedy captions every K steps (0: off)

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, context_length: int = 77, **overrides) -> "PretrainConfig":
        if name not in SIZES:
            raise ValueError(f"unknown preset {name!r}: use {', '.join(SIZES)}")
        encoder = EncoderConfig(**dataclasses.asdict(SIZES[name]))
        decoder = DecoderConfig.for_encoder(encoder, vocab_size, context_length)
        return cls(preset=name, encoder=encoder, decoder=decoder, **overrides)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step on one rank (micro-batch × accumulation)."""
        return self.batch_size * self.accumulation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        values = dict(data)
        values["encoder"] = _build(EncoderConfig, data["encoder"])
        values["decoder"] = DecoderConfig.from_dict(data["decoder"])
        # A run's config.json is a file a person can edit: sizes that cannot make a model are
        # refused here, before any array is allocated.
        check_tower("encoder", values["encoder"], ("patch_size", "image_size", "num_channels"))
        check_tower("decoder", values["decoder"], ("vocab_size", "context_length"))
        for key in ("betas", "crop_scale", "mean", "std"):
            values[key] = tuple(values[key])
        return _build(cls, values)

    def check_schedule(self) -> None:
        """A warmup longer than the run would never reach the peak learning rate: refused."""
        if self.warmup_steps > self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} is longer than the run (--steps {self.steps}); "
                             "use at most as many warmup steps as steps")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
