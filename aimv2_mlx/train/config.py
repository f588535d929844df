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
from ..errors import SettingError
from ..objective import OBJECTIVES


@dataclass(frozen=True)
class EncoderSize:
    """What a `--preset` fixes: the encoder's width, depth, heads, SwiGLU hidden size, image
    size.
    """

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

# The compute dtypes a run trains in. float16 is refused: without loss scaling its 5-bit exponent
# underflows the small gradients of the pixel loss (bfloat16 keeps float32's exponent).
DTYPES = ("float32", "bfloat16")

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
    # float32 | bfloat16 (compute; master weights, norms' statistics, losses fp32)
    dtype: str = "float32"
    compile: bool = True
    seed: int = 0
    crop_scale: tuple[float, float] = (0.4, 1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Every 100 steps: below the README's 250-step example run, so an interrupted or crashed
    # laptop run keeps its progress; `checkpoint_minutes` bounds the loss for slow, large runs.
    checkpoint_every: int = 100
    # also save when this long has passed since the last save (0: off)
    checkpoint_minutes: float = 10.0
    log_every: int = 10
    sample_every: int = 0  # reconstruction grid + greedy captions every K steps (0: off)

    def __post_init__(self):
        """A dtype or objective no run can train with is refused when the config is made."""
        self.check_choices()

    def check_choices(self) -> None:
        if self.objective not in OBJECTIVES:
            raise SettingError(f"unknown objective {self.objective!r}: use {', '.join(OBJECTIVES)}")
        if self.dtype == "float16":
            raise SettingError(
                "dtype 'float16' does not train (no loss scaling, so small "
                "gradients underflow): use bfloat16 for half-precision compute, "
                "or float32"
            )
        if self.dtype not in DTYPES:
            raise SettingError(f"unknown dtype {self.dtype!r}: use {' or '.join(DTYPES)}")

    @classmethod
    def from_preset(
        cls,
        name: str,
        vocab_size: int,
        context_length: int = 77,
        *,
        image_size: int | None = None,
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        **overrides,
    ) -> PretrainConfig:
        """A preset's sizes, any of them replaced (None: the preset's); the other fields from
        `overrides` or the defaults."""
        if name not in SIZES:
            raise SettingError(f"unknown preset {name!r}: use {', '.join(SIZES)}")
        preset = EncoderConfig(**dataclasses.asdict(SIZES[name]))
        encoder = resized(
            preset,
            image_size=image_size,
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
        )
        decoder = resized(
            DecoderConfig.for_encoder(encoder, vocab_size, context_length),
            hidden_size=decoder_width,
            num_hidden_layers=decoder_depth,
            num_attention_heads=decoder_heads,
        )
        return cls(preset=name, encoder=encoder, decoder=decoder, **overrides)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step on one rank (micro-batch × accumulation)."""
        return self.batch_size * self.accumulation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PretrainConfig:
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

    def check(self) -> None:
        """Sizes that cannot make the model, and a schedule that cannot run, refused before any
        array is allocated."""
        self.check_choices()
        for part in (self.encoder, self.decoder):
            if part.hidden_size % part.num_attention_heads:
                raise SettingError(
                    f"width {part.hidden_size} is not divisible by {part.num_attention_heads} heads"
                )
        if self.encoder.image_size % self.encoder.patch_size:
            raise SettingError(
                f"image size {self.encoder.image_size} is not a multiple of the "
                f"patch size {self.encoder.patch_size}"
            )
        self.check_schedule()

    def check_schedule(self) -> None:
        """A warmup longer than the run would never reach the peak learning rate: refused."""
        if self.warmup_steps > self.steps:
            raise SettingError(
                f"--warmup-steps {self.warmup_steps} is longer than the run (--steps "
                f"{self.steps}); "
                "use at most as many warmup steps as steps"
            )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def swiglu_hidden(width: int) -> int:
    """The SwiGLU hidden size for a width: 8/3 of it (the 4x MLP's parameter count with a third
    weight matrix, Shazeer 2020, arXiv 2002.05202 section 2), rounded up to a multiple of 64."""
    return (int(2 * 4 * width / 3) + 63) // 64 * 64


def resized(tower, **sizes):
    """`tower` (an encoder or decoder config) with the sizes given (not None) replaced; a new
    width without a new MLP size keeps the 8/3 SwiGLU ratio."""
    sizes = {key: value for key, value in sizes.items() if value is not None}
    if "hidden_size" in sizes and "intermediate_size" not in sizes:
        sizes["intermediate_size"] = swiglu_hidden(sizes["hidden_size"])
    return dataclasses.replace(tower, **sizes)
