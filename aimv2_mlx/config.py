"""Model configuration: dataclasses that round-trip through `config.json`.

One encoder definition serves every AIMv2 size; sizes, resolutions, native and LiT variants are
just configs (`PRESETS`). Field names follow transformers' AIMv2 configs so foreign
`config.json` files map across without a dictionary of synonyms.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SettingError

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
    eos_token_id: int = 49407  # where the text tower pools: the tokenizer's end token
    pad_token_id: int = 0  # what the tokenizer pads with (CLIP's: zeros)
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
    def for_mode(cls, mode: str, size: int) -> PreprocessConfig:
        if mode == "clip":
            return cls("clip", size, CLIP_MEAN, CLIP_STD, 1.0)
        if mode == "ml-aim":
            return cls("ml-aim", size, IMAGENET_MEAN, IMAGENET_STD, 0.875)
        if mode == "native":
            return cls("native", size, CLIP_MEAN, CLIP_STD, 1.0)
        raise SettingError(f"unknown preprocessing mode {mode!r}: use clip, ml-aim or native")

    def to_hub(self) -> dict:
        """This recipe as a `CLIPImageProcessor` `preprocessor_config.json`, for other tools."""
        fixed = self.mode != "native"
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": fixed,
            "size": {"shortest_edge": math.ceil(self.size / self.crop_fraction)},
            "resample": 3,
            "do_center_crop": fixed,
            "crop_size": {"height": self.size, "width": self.size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }


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
    def from_dict(cls, data: dict) -> ModelConfig:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SettingError("not an aimv2-mlx config (no 'format': 'aimv2-mlx')")
        text = data.get("text")
        pre = dict(_section(data, "preprocess") or {})
        for key in ("mean", "std"):
            if isinstance(pre.get(key), list):
                pre[key] = tuple(pre[key])
        return cls(
            name=data.get("name", ""),
            vision=_build(EncoderConfig, _section(data, "vision", required=True)),
            text=_build(TextConfig, _section(data, "text")) if text else None,
            projection_dim=data.get("projection_dim"),
            max_logit_scale=data.get("max_logit_scale", 100.0),
            preprocess=_build(PreprocessConfig, pre),
            source=_section(data, "source") or {},
            quantization=_section(data, "quantization"),
        )

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(folder, "config.json").read_text()))


def _section(data: dict, key: str, required: bool = False) -> dict | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise SettingError(f"config field {key!r} must be an object, not {type(value).__name__}")
    return value


def _build(kind, values: dict):
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in values.items() if k in names})


# Bounds on sizes, far above every released AIMv2 (3B: width 3072, MLP 8192, 24 blocks, 448 px)
# and its CLIP-style text tower (arXiv 2411.14402, Table 1; apple/ml-aim), so that a config is
# refused before it can describe a model larger than any memory.
LIMITS = {
    "hidden_size": 16384,
    "num_hidden_layers": 256,
    "num_attention_heads": 1024,
    "intermediate_size": 65536,
    "patch_size": 256,
    "image_size": 8192,
    "num_channels": 16,
    "vocab_size": 1 << 20,
    "max_position_embeddings": 8192,
    "context_length": 8192,
    "projection_dim": 16384,
    "size": 8192,
}


def check_config(config: ModelConfig) -> None:
    """Refuse a config whose fields cannot make a model: ValueError naming the field and its value.

    Every size is a whole number within `LIMITS`, widths divide into heads, images into patches,
    and floats are finite and in range; foreign JSON types (strings, booleans) are refused too.
    """
    if not isinstance(config.name, str):
        raise SettingError(f"config field 'name' must be a string, not {config.name!r}")
    check_tower("vision", config.vision, ("patch_size", "image_size", "num_channels"))
    vision = config.vision
    for flag in ("is_native", "use_head"):
        if not isinstance(getattr(vision, flag), bool):
            raise SettingError(
                f"config field 'vision.{flag}' must be true or false, not {getattr(vision, flag)!r}"
            )
    if vision.image_size % vision.patch_size:
        raise SettingError(
            f"config field 'vision.image_size' ({vision.image_size}) is not a multiple of "
            f"'vision.patch_size' ({vision.patch_size})"
        )
    if vision.is_native and vision.hidden_size % 4:
        raise SettingError(
            f"config field 'vision.hidden_size' ({vision.hidden_size}) must be a multiple of 4 "
            "for the native model's 2-D sin-cos positions"
        )
    if config.text is not None:
        check_tower("text", config.text, ("vocab_size", "max_position_embeddings"))
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(config.text, name)
            if not _whole(value) or not 0 <= value < config.text.vocab_size:
                raise SettingError(
                    f"config field 'text.{name}' must be a token id below "
                    f"{config.text.vocab_size}, not {value!r}"
                )
        _check_size("projection_dim", config.projection_dim)
    elif config.projection_dim is not None:
        _check_size("projection_dim", config.projection_dim)
    _check_float("max_logit_scale", config.max_logit_scale, 0, math.inf)
    _check_preprocess(config.preprocess)
    quant = config.quantization
    if quant is not None and not (
        isinstance(quant, dict)
        and quant.get("bits") in (4, 8)
        and quant.get("group_size") in (32, 64, 128)
    ):
        raise SettingError(
            f"config field 'quantization' must give bits 4 or 8 and group_size 32, 64 or 128, "
            f"not {quant!r}"
        )


def check_tower(section: str, tower, extra: tuple[str, ...] = ()) -> None:
    """One transformer's sizes (`hidden_size`, depth, heads, SwiGLU hidden, eps and `extra`
    fields).
    """
    for field_name in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        *extra,
    ):
        _check_size(f"{section}.{field_name}", getattr(tower, field_name))
    if tower.hidden_size % tower.num_attention_heads:
        raise SettingError(
            f"config field '{section}.hidden_size' ({tower.hidden_size}) is not divisible by "
            f"'{section}.num_attention_heads' ({tower.num_attention_heads})"
        )
    _check_float(f"{section}.rms_norm_eps", tower.rms_norm_eps, 0, 1)


def _check_preprocess(pre: PreprocessConfig) -> None:
    if pre.mode not in ("clip", "ml-aim", "native"):
        raise SettingError(
            f"config field 'preprocess.mode' must be clip, ml-aim or native, not {pre.mode!r}"
        )
    _check_size("preprocess.size", pre.size)
    _check_float("preprocess.crop_fraction", pre.crop_fraction, 0, 1, closed_top=True)
    for key in ("mean", "std"):
        values = getattr(pre, key)
        if not isinstance(values, (tuple, list)) or len(values) != 3:
            raise SettingError(
                f"config field 'preprocess.{key}' must be three numbers, not {values!r}"
            )
        for value in values:
            _check_float(f"preprocess.{key}", value, -math.inf if key == "mean" else 0, math.inf)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_size(name: str, value) -> None:
    limit = LIMITS[name.rpartition(".")[2]]
    if not _whole(value) or not 1 <= value <= limit:
        raise SettingError(
            f"config field {name!r} must be a whole number from 1 to {limit}, not {value!r}"
        )


def _check_float(name: str, value, low: float, high: float, closed_top: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (
        number
        and math.isfinite(value)
        and low < value
        and (value <= high if closed_top else value < high)
    ):
        raise SettingError(f"config field {name!r} is out of range: {value!r}")


_SIZES = {
    # name: (width, depth, heads, SwiGLU hidden)
    "large": (1024, 24, 8, 2816),
    "huge": (1536, 24, 12, 4096),
    "1B": (2048, 24, 16, 5632),
    "3B": (3072, 24, 24, 8192),
}


# ml-aim's pinned hub revisions: the original (ml-aim) layout of each released checkpoint.
ML_AIM_REVISIONS = {
    "aimv2-large-patch14-224": "ac764a25c832c7dc5e11871daa588e98e3cdbfb7",
    "aimv2-huge-patch14-224": "9e0bab0e0abb7b20796d2d0b37f39b7c3b1c1af1",
    "aimv2-1B-patch14-224": "4d24a422f71e87d327d476bc405030fe6593d8b1",
    "aimv2-3B-patch14-224": "df1cbc288096c9742ec8bd6709ff82757972338c",
    "aimv2-large-patch14-336": "639423ae9f07319d24a7fc431b61908110d08d3a",
    "aimv2-huge-patch14-336": "21528bd53a2438a84162e79f1f9a46453b88004c",
    "aimv2-1B-patch14-336": "5a15f23f6757776fdd487283353a018677621939",
    "aimv2-3B-patch14-336": "d1adb39ee92dfd7ecf3114b1ee3aa7e9027ce98f",
    "aimv2-large-patch14-448": "cefb13f21003bdadba65bfbee956c82b976cd23d",
    "aimv2-huge-patch14-448": "44e6440a24a8ea966ad0deadf5399a22d852bcc0",
    "aimv2-1B-patch14-448": "7f292735d3a07a911559c0fabb3ad3e9d141713f",
    "aimv2-3B-patch14-448": "70810b618e4456b724bacc8ef4d2d038060ceda6",
    "aimv2-large-patch14-224-distilled": "d6d09b071e8ba31735c5e05ccd4b2a393020ce90",
    "aimv2-large-patch14-336-distilled": "8fe1704e5cc1c80cefc99c194afcefe21dff1faa",
    "aimv2-large-patch14-native": "cfe7bdbbc924a5f65272d5e2c27fe5f61771a629",
    "aimv2-large-patch14-224-lit": "c2cd59a786c4c06f39d199c50d08cc2eab9f8605",
}


def official_name(repo_or_name: str) -> str | None:
    """The released model's name for `apple/aimv2-…` or a bare `aimv2-…`, else None."""
    owner, _, name = str(repo_or_name).rpartition("/")
    return name if owner in ("", "apple") and name in ML_AIM_REVISIONS else None


def family_of(vision: EncoderConfig) -> str | None:
    """ "large", "huge", "1B" or "3B" when the encoder has that family's width and MLP; else
    None.
    """
    for family, (width, _, _, hidden) in _SIZES.items():
        if (vision.hidden_size, vision.intermediate_size) == (width, hidden):
            return family
    return None


def default_heads(width: int) -> int:
    """Heads for a width: the AIMv2 family's count, else head dim 128 as in every family."""
    for family_width, _, heads, _ in _SIZES.values():
        if family_width == width:
            return heads
    return max(1, width // 128)


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
        raise SettingError(f"unknown model name {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict(PRESETS[key].to_dict())


@dataclass
class DecoderConfig:
    """The pre-training decoder: one causal transformer over image tokens + caption.

    The recipe of apple/ml-l3m, configs/aimv2/001_aimv2_hfdata.yaml.

    Saved with training checkpoints only; exported encoders never carry it.
    """

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 2816
    vocab_size: int = 32000
    context_length: int = 77
    rms_norm_eps: float = 1e-5

    @classmethod
    def for_encoder(
        cls, vision: EncoderConfig, vocab_size: int = 32000, context_length: int = 77
    ) -> DecoderConfig:
        """The default decoder for an encoder: same width, heads and MLP, half the depth (L: 12
        blocks).
        """
        return cls(
            vision.hidden_size,
            max(1, vision.num_hidden_layers // 2),
            vision.num_attention_heads,
            vision.intermediate_size,
            vocab_size,
            context_length,
            vision.rms_norm_eps,
        )

    @classmethod
    def from_dict(cls, values: dict) -> DecoderConfig:
        return _build(cls, values)
