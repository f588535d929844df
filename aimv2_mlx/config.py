"""Model configuration: dataclasses that round-trip through `config.json`.

One encoder definition serves every AIMv2 size; sizes, resolutions, native and LiT variants are
just configs (`PRESETS`). Field names follow transformers' AIMv2 configs so foreign
`config.json` files map across without a dictionary of synonyms.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "aimv2-mlx"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    intermediate_size: int = 2816
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    rms_norm_eps: float = 1e-5
    is_native: bool = False
    use_head: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    intermediate_size: int = 2048
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    rms_norm_eps: float = 1e-5


@dataclass
class PreprocessConfig:
    """How images become pixels. `mode`: "clip" (hub default), "ml-aim" or "native"."""

    mode: str = "clip"
    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_fraction: float = 1.0

    @classmethod
    def for_mode(cls, mode: str, size: int) -> "PreprocessConfig":
        if mode == "clip":
            return cls("clip", size, CLIP_MEAN, CLIP_STD, 1.0)
        if mode == "ml-aim":
            return cls("ml-aim", size, IMAGENET_MEAN, IMAGENET_STD, 0.875)
        if mode == "native":
            return cls("native", size, CLIP_MEAN, CLIP_STD, 1.0)
        raise ValueError(f"unknown preprocessing mode {mode!r}: use clip, ml-aim or native")


@dataclass
class ModelConfig:
    """Everything `load()` needs to rebuild a model; written as `config.json`."""

    name: str = "aimv2-large-patch14-224"
    vision: EncoderConfig = field(default_factory=EncoderConfig)
    text: TextConfig | None = None
    projection_dim: int | None = None
    max_logit_scale: float = 100.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    source: dict = field(default_factory=dict)
    quantization: dict | None = None

    @property
    def is_lit(self) -> bool:
        return self.text is not None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {"format": FORMAT, "format_version": 1, **data}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if data.get("format") != FORMAT:
            raise ValueError("not an aimv2-mlx config (no 'format': 'aimv2-mlx')")
        text = data.get("text")
        pre = dict(data.get("preprocess") or {})
        for key in ("mean", "std"):
            if key in pre:
                pre[key] = tuple(pre[key])
        return cls(
            name=data.get("name", ""),
            vision=_build(EncoderConfig, data["vision"]),
            text=_build(TextConfig, text) if text else None,
            projection_dim=data.get("projection_dim"),
            max_logit_scale=data.get("max_logit_scale", 100.0),
            preprocess=_build(PreprocessConfig, pre),
            source=data.get("source") or {},
            quantization=data.get("quantization"),
        )

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(folder, "config.json").read_text()))


def _build(kind, values: dict):
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in values.items() if k in names})


_SIZES = {
    # name: (width, depth, heads, SwiGLU hidden)
    "large": (1024, 24, 8, 2816),
    "huge": (1536, 24, 12, 4096),
    "1B": (2048, 24, 16, 5632),
    "3B": (3072, 24, 24, 8192),
}


def _official_presets() -> dict[str, ModelConfig]:
    presets = {}
    for size, (width, depth, heads, hidden) in _SIZES.items():
        for res in (224, 336, 448):
            name = f"aimv2-{size}-patch14-{res}"
            presets[name] = ModelConfig(
                name=name,
                vision=EncoderConfig(width, depth, heads, hidden, image_size=res),
                preprocess=PreprocessConfig.for_mode("clip", res),
            )
    for res in (224, 336):
        name = f"aimv2-large-patch14-{res}-distilled"
        presets[name] = dataclasses.replace(presets[f"aimv2-large-patch14-{res}"], name=name)
    presets["aimv2-large-patch14-native"] = ModelConfig(
        name="aimv2-large-patch14-native",
        vision=EncoderConfig(is_native=True),
        preprocess=PreprocessConfig.for_mode("native", 224),
    )
    presets["aimv2-large-patch14-224-lit"] = ModelConfig(
        name="aimv2-large-patch14-224-lit",
        vision=EncoderConfig(use_head=True),
        text=TextConfig(),
        projection_dim=768,
    )
    return presets


PRESETS: dict[str, ModelConfig] = _official_presets()


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named config (`aimv2-large-patch14-224`, `apple/…` accepted)."""
    key = name.removeprefix("apple/")
    if key not in PRESETS:
        raise KeyError(f"unknown model name {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict(PRESETS[key].to_dict())
