"""What a LiT-tuning run is: the locked encoder, the text tower's sizes, optimisation and data.

The text tower is the LiT architecture of Apple's `aimv2-large-patch14-224-lit` (aimv2_mlx/lit.py:
causal RMSNorm/SwiGLU transformer pooled at the first end token, attention-pool image head,
bias-free projections, logit scale). Its default size follows the encoder: same width, heads and
MLP, half the depth, projections to the encoder's width.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import EncoderConfig, TextConfig, _build, check_tower
from ..errors import SettingError

KIND = "aimv2 lit"  # the `kind` field that marks a run folder's config.json as a LiT run
LOSSES = ("softmax",)
FEATURE_DTYPES = ("float32", "float16")
# What a resumed run may change: its length (the schedule follows it) and when it logs and saves.
RESUMABLE = ("steps", "checkpoint_every", "checkpoint_minutes", "log_every")


@dataclass
class LitConfig:
    encoder: str = "bundled"  # the locked image encoder: a model folder, hub id or "bundled"
    # its name and weights fingerprint (set by the run)
    encoder_identity: dict = field(default_factory=dict)
    vision: EncoderConfig | None = None  # its config, with the attention-pool head (set by the run)
    # vocab_size/eos_token_id come from the tokenizer
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 768
    loss: str = "softmax"  # CLIP's symmetric softmax cross-entropy (see loss.py)
    batch_size: int = 64  # per rank: the contrastive batch is batch_size x ranks
    steps: int = 1000
    warmup_steps: int = 100
    peak_lr: float = 1e-3
    start_lr: float = 1e-6
    end_lr: float = 1e-5
    weight_decay: float = 0.1  # MLX/PyTorch AdamW semantics: p *= 1 - lr·wd
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's (arXiv 2103.00020, Table 19)
    eps: float = 1e-6
    grad_clip: float = 1.0
    # how the cached encoder tokens are stored (float16 halves the disk)
    feature_dtype: str = "float32"
    feature_batch_size: int = 32  # images per forward pass while caching features
    compile: bool = True
    seed: int = 0
    checkpoint_every: int = 100
    checkpoint_minutes: float = 10.0
    log_every: int = 10

    @classmethod
    def for_encoder(
        cls,
        encoder: str,
        vision: EncoderConfig,
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        projection_dim: int | None = None,
        context_length: int = 77,
        vocab_size: int = 1024,
        **overrides,
    ) -> LitConfig:
        """A run for `vision`: the text tower has its width, heads and MLP and half its depth unless
        given (a new width gets the 8/3 SwiGLU ratio rounded up to 64); the warmup, unless given,
        is 100 steps or a tenth of the run, whichever is shorter."""
        hidden = (
            vision.intermediate_size if width is None else (int(2 * 4 * width / 3) + 63) // 64 * 64
        )
        text = TextConfig(
            vocab_size=vocab_size,
            hidden_size=width or vision.hidden_size,
            num_hidden_layers=depth or max(1, vision.num_hidden_layers // 2),
            num_attention_heads=heads or vision.num_attention_heads,
            intermediate_size=hidden,
            max_position_embeddings=context_length,
        )
        overrides.setdefault("warmup_steps", min(100, overrides.get("steps", cls.steps) // 10))
        return cls(
            encoder=encoder,
            text=text,
            projection_dim=projection_dim or text.hidden_size,
            **overrides,
        )

    def to_dict(self) -> dict:
        return {"kind": KIND, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> LitConfig:
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise SettingError("not a LiT-tuning run config (no 'kind': 'aimv2 lit')")
        values = dict(data)
        values["text"] = _build(TextConfig, data["text"])
        check_tower("text", values["text"], ("vocab_size", "max_position_embeddings"))
        if data.get("vision") is not None:
            values["vision"] = _build(EncoderConfig, data["vision"])
            check_tower("vision", values["vision"], ("patch_size", "image_size", "num_channels"))
        values["betas"] = tuple(values["betas"])
        return _build(cls, values)

    def check(self) -> None:
        """Refuse settings that cannot make a run (ValueError naming the option)."""
        if self.loss not in LOSSES:
            raise SettingError(f"unknown loss {self.loss!r}: use {', '.join(LOSSES)}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise SettingError(
                f"unknown feature dtype {self.feature_dtype!r}: use {', '.join(FEATURE_DTYPES)}"
            )
        if self.batch_size < 2:
            raise SettingError(
                f"--batch-size {self.batch_size}: a contrastive batch needs at least 2 pairs"
            )
        if self.warmup_steps > self.steps:
            raise SettingError(
                f"--warmup-steps {self.warmup_steps} is longer than the run "
                f"(--steps {self.steps}); "
                "use at most as many warmup steps as steps"
            )
        check_tower("text", self.text, ("max_position_embeddings",))
        if self.text.max_position_embeddings < 3:
            raise SettingError(
                "--context-length must be at least 3 (start token, one token, end token)"
            )

    def check_schedule(self) -> None:
        """What a resumed run with a new length must still satisfy (as `PretrainConfig`'s)."""
        self.check()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
