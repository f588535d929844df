"""Checkpoint layouts: recognise them by their keys, map them onto ours, infer the config.

Our layout is ml-aim's MLX layout (`preprocessor.patchifier.proj.weight` channels-last,
`trunk.blocks.{i}.attn.qkv.weight`, …), so ml-aim files map by identity. transformers and timm
names are rewritten by the rules below; transformers' separate q/k/v projections are fused by
name (its state dict lists them k, v, q). `load()` and `aimv2 convert` both use this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .config import EncoderConfig, ModelConfig, PreprocessConfig, TextConfig, default_heads
from .errors import Aimv2Error

# torch pickle checkpoints (transformers `pytorch_model.bin`, ml-aim `.pth`, timm `.pt`): what a
# folder is searched for and what the hub fetches with --allow-pickle.
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt")

ML_AIM_MLX = "ml-aim-mlx"
ML_AIM_TORCH = "ml-aim-torch"
TRANSFORMERS = "transformers"
TIMM = "timm"

_BLOCK_RULES = {
    TRANSFORMERS: [
        (r"embeddings\.patch_embed\.(weight|bias)", r"preprocessor.patchifier.proj.\1"),
        (r"embeddings\.rms_norm\.weight", "preprocessor.patchifier.norm.weight"),
        (r"embeddings\.position_embedding\.weight", "preprocessor.pos_embed"),
        (r"embeddings\.token_embedding\.weight", "preprocessor.text_embedding.weight"),
        (r"encoder\.layers\.(\d+)\.rms_norm1\.weight", r"trunk.blocks.\1.norm_1.weight"),
        (r"encoder\.layers\.(\d+)\.rms_norm2\.weight", r"trunk.blocks.\1.norm_2.weight"),
        (
            r"encoder\.layers\.(\d+)\.attention\.out_proj\.weight",
            r"trunk.blocks.\1.attn.proj.weight",
        ),
        (r"encoder\.layers\.(\d+)\.ffn\.gate_proj\.weight", r"trunk.blocks.\1.mlp.fc1.weight"),
        (r"encoder\.layers\.(\d+)\.ffn\.up_proj\.weight", r"trunk.blocks.\1.mlp.fc3.weight"),
        (r"encoder\.layers\.(\d+)\.ffn\.down_proj\.weight", r"trunk.blocks.\1.mlp.fc2.weight"),
        (r"rms_norm\.weight", "trunk.post_trunk_norm.weight"),
        (r"head\.cls_token", "head.cls_token"),
        (r"head\.k_proj\.weight", "head.k.weight"),
        (r"head\.v_proj\.weight", "head.v.weight"),
        (r"head\.output_proj\.(weight|bias)", r"head.linear.\1"),
    ],
    TIMM: [
        (r"patch_embed\.proj\.(weight|bias)", r"preprocessor.patchifier.proj.\1"),
        (r"patch_embed\.norm\.weight", "preprocessor.patchifier.norm.weight"),
        (r"pos_embed", "preprocessor.pos_embed"),
        (r"blocks\.(\d+)\.norm1\.weight", r"trunk.blocks.\1.norm_1.weight"),
        (r"blocks\.(\d+)\.norm2\.weight", r"trunk.blocks.\1.norm_2.weight"),
        (r"blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"trunk.blocks.\1.attn.\2.weight"),
        (r"blocks\.(\d+)\.mlp\.fc1_g\.weight", r"trunk.blocks.\1.mlp.fc1.weight"),
        (r"blocks\.(\d+)\.mlp\.fc1_x\.weight", r"trunk.blocks.\1.mlp.fc3.weight"),
        (r"blocks\.(\d+)\.mlp\.fc2\.weight", r"trunk.blocks.\1.mlp.fc2.weight"),
        (r"norm\.weight", "trunk.post_trunk_norm.weight"),
    ],
}
_TRANSFORMERS_QKV = re.compile(r"(.*)encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.weight")
_TRANSFORMERS_TOWERS = {
    "vision_model.": "image_encoder.",
    "text_model.": "text_encoder.",
    "visual_projection.": "image_projector.",
    "text_projection.": "text_projector.",
}


class CheckpointError(Aimv2Error, ValueError):
    """A checkpoint that cannot be used; the message names the file or key and the reason."""


def shape_of(value) -> tuple[int, ...]:
    """The shape of an array, a lazy tensor reference, or a shape tuple itself."""
    return tuple(value) if isinstance(value, tuple) else tuple(value.shape)


def detect_layout(weights: Mapping) -> str:
    """Which layout a state dict is in, judged by its keys and shapes only (values or shapes)."""
    if is_l3m(weights):
        return ML_L3M
    for key, value in weights.items():
        if key.endswith("preprocessor.patchifier.proj.weight"):
            shape = shape_of(value)
            return ML_AIM_MLX if shape[-1] < shape[1] else ML_AIM_TORCH
    if any(k.endswith("embeddings.patch_embed.weight") for k in weights):
        return TRANSFORMERS
    if "patch_embed.proj.weight" in weights and "blocks.0.mlp.fc1_g.weight" in weights:
        return TIMM
    sample = ", ".join(sorted(weights)[:3])
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {sample})")


@dataclass(frozen=True)
class Recipe:
    """How one of our tensors is made from a checkpoint's: renamed, maybe fused or reshaped.

    `op`: "copy"; "conv" (torch (O, I, kH, kW) -> MLX (O, kH, kW, I)); "pos" ((N, D) -> (1, N, D));
    "scalar" (-> ()); "qkv" (transformers' q, k, v projections stacked in that order).
    """

    sources: tuple[str, ...]
    op: str = "copy"

    def shape(self, shapes: Mapping) -> tuple[int, ...]:
        first = shape_of(shapes[self.sources[0]])
        if self.op == "conv":
            return (first[0], first[2], first[3], first[1])
        if self.op == "pos":
            return (1, *first)
        if self.op == "scalar":
            return ()
        if self.op == "qkv":
            return (sum(shape_of(shapes[s])[0] for s in self.sources), *first[1:])
        return first

    def build(self, get: Callable[[str], mx.array]) -> mx.array:
        values = [get(s) for s in self.sources]
        if self.op == "qkv":
            return mx.concatenate(values, axis=0)
        value = values[0]
        if self.op == "conv":
            return value.transpose(0, 2, 3, 1)
        if self.op == "pos":
            return value[None]
        if self.op == "scalar":
            return value.reshape(())
        return value


def plan(weights: Mapping, layout: str | None = None) -> dict[str, Recipe]:
    """Our key -> how to make it, for a state dict (values or shapes) of any supported layout."""
    layout = layout or detect_layout(weights)
    if layout == ML_L3M:
        return l3m_encoder_plan(weights)
    recipes: dict[str, Recipe] = {}
    qkv_parts: dict[str, dict[str, str]] = {}
    for key in weights:
        if layout == TRANSFORMERS:
            match = _TRANSFORMERS_QKV.fullmatch(key)
            if match:
                prefix, block, part = match.groups()
                target = f"{_tower(prefix)}trunk.blocks.{block}.attn.qkv.weight"
                qkv_parts.setdefault(target, {})[part] = key
                continue
            new_key = _rename_transformers(key)
        elif layout == TIMM:
            new_key = _apply_rules(_BLOCK_RULES[TIMM], key)
        else:
            new_key = key
        if new_key is None:
            raise CheckpointError(f"unexpected tensor {key!r} in a {layout} checkpoint")
        recipes[new_key] = Recipe((key,), _op(new_key, shape_of(weights[key]), layout))
    for target, parts in qkv_parts.items():
        missing = {"q", "k", "v"} - parts.keys()
        if missing:
            raise CheckpointError(f"{target}: missing {sorted(missing)} projection(s)")
        recipes[target] = Recipe((parts["q"], parts["k"], parts["v"]), "qkv")
    return recipes


def to_ours(weights: dict[str, mx.array], layout: str | None = None) -> dict[str, mx.array]:
    """Rename and reshape a state dict of any supported layout into our MLX layout."""
    return {key: recipe.build(weights.__getitem__) for key, recipe in plan(weights, layout).items()}


def ours_for_transformers_key(key: str) -> tuple[str | None, int | None]:
    """Our key for a transformers key and, for q/k/v, which row block of our fused qkv it is."""
    match = _TRANSFORMERS_QKV.fullmatch(key)
    if match:
        prefix, block, part = match.groups()
        return f"{_tower(prefix)}trunk.blocks.{block}.attn.qkv.weight", "qkv".index(part)
    return _rename_transformers(key), None


def _op(key: str, shape: tuple[int, ...], layout: str) -> str:
    if key.endswith("patchifier.proj.weight") and layout != ML_AIM_MLX:
        return "conv"
    if key.endswith("preprocessor.pos_embed") and len(shape) == 2:
        return "pos"
    if key.endswith("log_logit_scale") and shape != ():
        return "scalar"
    return "copy"


def _tower(prefix: str) -> str:
    return _TRANSFORMERS_TOWERS.get(prefix, prefix)


def _rename_transformers(key: str) -> str | None:
    if key == "logit_scale":
        return "log_logit_scale"
    for theirs, ours in _TRANSFORMERS_TOWERS.items():
        if key.startswith(theirs):
            if theirs.endswith("projection."):
                return ours + key[len(theirs) :]
            rest = key[len(theirs) :]
            if theirs == "text_model." and rest == "embeddings.position_embedding.weight":
                return ours + "preprocessor.positional_embedding"
            mapped = _apply_rules(_BLOCK_RULES[TRANSFORMERS], rest)
            return None if mapped is None else ours + mapped
    return _apply_rules(_BLOCK_RULES[TRANSFORMERS], key)


def _apply_rules(rules, key: str) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def check_tensors(expected: Mapping, found: Mapping, origin) -> None:
    """Refuse a missing, unexpected or wrongly shaped tensor, naming it and `origin`."""
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{origin}: missing tensor {missing[0]!r}" + _more(missing))
    if extra:
        raise CheckpointError(f"{origin}: unexpected tensor {extra[0]!r}" + _more(extra))
    for key, value in found.items():
        if shape_of(value) != shape_of(expected[key]):
            raise CheckpointError(
                f"{origin}: tensor {key!r} has shape {shape_of(value)}, expected "
                f"{shape_of(expected[key])}"
            )


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def infer_config(
    weights: Mapping,
    config_json: dict | None = None,
    preprocessor_json: dict | None = None,
    name: str = "",
) -> ModelConfig:
    """Build our config from tensor shapes (our layout; values or shapes), taking heads, eps and
    ids from any foreign config.json; heads default to the AIMv2 family of that width."""
    config_json = config_json or {}
    lit = "image_encoder.preprocessor.patchifier.proj.weight" in weights
    vision_json = _json_section(config_json, "vision_config") or config_json
    vision = _vision_config(weights, "image_encoder." if lit else "", vision_json)
    text = projection = None
    if lit:
        text = _text_config(weights, _json_section(config_json, "text_config") or {})
        projection = shape_of(weights["image_projector.weight"])[0]
    mode = "native" if vision.is_native else "clip"
    preprocess = PreprocessConfig.for_mode(mode, vision.image_size)
    if preprocessor_json and not vision.is_native:
        preprocess = _preprocess_from_hub(preprocessor_json, preprocess)
    return ModelConfig(
        name=name,
        vision=vision,
        text=text,
        projection_dim=projection,
        max_logit_scale=config_json.get("max_logit_scale", 100.0),
        preprocess=preprocess,
    )


def _vision_config(weights: dict, prefix: str, cfg: dict) -> EncoderConfig:
    hidden, patch, _, channels = shape_of(weights[prefix + "preprocessor.patchifier.proj.weight"])
    depth = _count_blocks(weights, prefix + "trunk.blocks.")
    pos = weights.get(prefix + "preprocessor.pos_embed")
    native = pos is None
    image_size = cfg.get("image_size", 224) if native else round(shape_of(pos)[1] ** 0.5) * patch
    return EncoderConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=cfg.get("num_attention_heads", default_heads(hidden)),
        intermediate_size=shape_of(weights[prefix + "trunk.blocks.0.mlp.fc1.weight"])[0],
        patch_size=patch,
        image_size=image_size,
        num_channels=channels,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        is_native=native,
        use_head=(prefix + "head.cls_token") in weights,
    )


def _text_config(weights: dict, cfg: dict) -> TextConfig:
    vocab, hidden = shape_of(weights["text_encoder.preprocessor.text_embedding.weight"])
    pad = cfg.get("pad_token_id")  # transformers' PretrainedConfig: None when the model names none
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_count_blocks(weights, "text_encoder.trunk.blocks."),
        num_attention_heads=cfg.get("num_attention_heads", default_heads(hidden)),
        intermediate_size=shape_of(weights["text_encoder.trunk.blocks.0.mlp.fc1.weight"])[0],
        max_position_embeddings=shape_of(weights["text_encoder.preprocessor.positional_embedding"])[
            0
        ],
        eos_token_id=cfg.get("eos_token_id", vocab - 1),  # CLIP: <|endoftext|> is the last id
        pad_token_id=pad if isinstance(pad, int) else 0,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
    )


def _json_section(config_json: dict, key: str) -> dict | None:
    value = config_json.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"config field {key!r} must be an object, not {type(value).__name__}")
    return value


def _count_blocks(weights: Mapping, prefix: str) -> int:
    """How many blocks the tensors under `prefix` make: numbered 0..n-1, none skipped."""
    found = set()
    for key in weights:
        if key.startswith(prefix):
            index = key[len(prefix) :].split(".")[0]
            if not index.isdigit() or not index.isascii():
                raise CheckpointError(f"tensor {key!r} has no block number")
            found.add(int(index))
    if not found:
        raise CheckpointError(f"no transformer blocks under {prefix!r}")
    if max(found) + 1 != len(found):
        missing = next(i for i in range(len(found) + 1) if i not in found)
        raise CheckpointError(
            f"block {missing} of {max(found) + 1} under {prefix!r} has no tensors"
        )
    return len(found)


def check_config_matches(config: ModelConfig, shapes: Mapping, origin) -> None:
    """Refuse a config that disagrees with the checkpoint on depth or width, before any model is
    built.

    Building follows the config; these few shapes bound everything a build allocates (blocks,
    widths, positions), and `check_tensors` then checks every tensor against the built model.
    """
    towers = [("image_encoder." if config.is_lit else "", config.vision)]
    if config.is_lit:
        towers.append(("text_encoder.", config.text))
    try:
        for prefix, tower in towers:
            blocks = _count_blocks(shapes, prefix + "trunk.blocks.")
            if blocks != tower.num_hidden_layers:
                raise CheckpointError(
                    f"config has {tower.num_hidden_layers} blocks, the checkpoint {blocks}"
                )
        vision, prefix = config.vision, towers[0][0]
        _expect(
            shapes,
            prefix + "preprocessor.patchifier.proj.weight",
            (vision.hidden_size, vision.patch_size, vision.patch_size, vision.num_channels),
        )
        if not vision.is_native:
            _expect(
                shapes,
                prefix + "preprocessor.pos_embed",
                (1, vision.num_patches, vision.hidden_size),
            )
        if config.is_lit:
            text = config.text
            _expect(
                shapes,
                "text_encoder.preprocessor.text_embedding.weight",
                (text.vocab_size, text.hidden_size),
            )
            _expect(
                shapes,
                "text_encoder.preprocessor.positional_embedding",
                (text.max_position_embeddings, text.hidden_size),
            )
    except CheckpointError as exc:
        raise CheckpointError(f"{origin}: {exc}") from None


def _expect(shapes: Mapping, key: str, shape: tuple[int, ...]) -> None:
    if key not in shapes:
        raise CheckpointError(f"missing tensor {key!r}")
    if shape_of(shapes[key]) != shape:
        raise CheckpointError(
            f"tensor {key!r} has shape {shape_of(shapes[key])}, the config needs {shape}"
        )


def _preprocess_from_hub(pre: dict, default: PreprocessConfig) -> PreprocessConfig:
    """The recipe of a `CLIPImageProcessor` config, its values left for `check_config` to judge."""
    if not isinstance(pre, dict):
        raise ValueError("config field 'preprocess' must be an object")
    crop = pre.get("crop_size", default.size)
    size = crop.get("height", default.size) if isinstance(crop, dict) else crop
    mean, std = pre.get("image_mean", default.mean), pre.get("image_std", default.std)
    return PreprocessConfig(
        mode="clip",
        size=size,
        mean=tuple(mean) if isinstance(mean, list) else mean,
        std=tuple(std) if isinstance(std, list) else std,
    )


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


# apple/ml-l3m's parameter names (configs/aimv2/001_aimv2_hfdata.yaml) mapped onto ours.
#
# The model is `InSeriesMetaModels` of an image encoder and a text decoder
# (src/l3m/model/meta_models.py), so every name starts `models.image_encoder.` or
# `models.text_decoder.`. Against ml-aim's layout (ours) the encoder differs in three ways: the
# preprocessor is a `MultiBlock` (`preprocessor.blocks.0.`), the patch conv is in torch layout,
# and attention keeps q, k and v as separate Linears (src/l3m/model/layers/attention.py
# `GenericAttention`), fused here in that order. The decoder's parts are renamed onto our
# `MultimodalDecoder`; its trunk is the encoder's kind of trunk. Both plans are made from names
# and shapes alone, before any tensor is read.
ML_L3M = "ml-l3m"
L3M_ENCODER = "models.image_encoder."
L3M_DECODER = "models.text_decoder."
L3M_MARKER = L3M_ENCODER + "preprocessor.blocks.0.patchifier.proj.weight"

_L3M_QKV = re.compile(r"(trunk\.blocks\.\d+\.attn)\.([qkv])_proj\.weight")
_L3M_TRUNK = re.compile(
    r"trunk\.(blocks\.\d+\.(norm_1|norm_2|attn\.proj|mlp\.fc[123])|post_trunk_norm)\.weight"
)
_L3M_ENCODER_PARTS = {
    "preprocessor.blocks.0.pos_embed": "preprocessor.pos_embed",
    "preprocessor.blocks.0.patchifier.proj.weight": "preprocessor.patchifier.proj.weight",
    "preprocessor.blocks.0.patchifier.proj.bias": "preprocessor.patchifier.proj.bias",
    "preprocessor.blocks.0.patchifier.norm.weight": "preprocessor.patchifier.norm.weight",
}
# src/l3m/model/preprocessors/multimodal.py `VisionAndTextPreprocessor`, .../vision.py
# `TextPreprocessor`; the head is a MultiBlock of two LinearClassifiers, text first.
_L3M_DECODER_PARTS = {
    "preprocessor.vision_preprocessor.module.weight": "image_projector.weight",
    "preprocessor.vision_preprocessor.module.bias": "image_projector.bias",
    "preprocessor.text_preprocessor.positional_embedding": "text_pos_embed",
    "preprocessor.text_preprocessor.cls_token": "cls",
    "preprocessor.text_preprocessor.text_embedding.weight": "text_embedding.weight",
    "head.blocks.0.linear.weight": "text_head.weight",
    "head.blocks.1.linear.weight": "pixel_head.weight",
}


def is_l3m(weights: Mapping) -> bool:
    return L3M_MARKER in weights


def _l3m_tower_plan(weights: Mapping, prefix: str, parts: dict[str, str]) -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    qkv: dict[str, dict[str, str]] = {}
    for key in weights:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        match = _L3M_QKV.fullmatch(rest)
        if match:
            qkv.setdefault(f"{match[1]}.qkv.weight", {})[match[2]] = key
        elif rest in parts:
            recipes[parts[rest]] = Recipe(
                (key,), "conv" if rest.endswith("patchifier.proj.weight") else "copy"
            )
        elif _L3M_TRUNK.fullmatch(rest):
            recipes[rest] = Recipe((key,))
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in an {ML_L3M} checkpoint")
    for target, found in qkv.items():
        missing = {"q", "k", "v"} - found.keys()
        if missing:
            raise CheckpointError(f"{prefix}{target}: missing {sorted(missing)} projection(s)")
        recipes[target] = Recipe((found["q"], found["k"], found["v"]), "qkv")
    return recipes


def l3m_encoder_plan(weights: Mapping) -> dict[str, Recipe]:
    """Our encoder key -> how to make it; decoder tensors are left out, any other refused."""
    strays = [k for k in weights if not k.startswith((L3M_ENCODER, L3M_DECODER))]
    if strays:
        raise CheckpointError(f"unexpected tensor {strays[0]!r} in an {ML_L3M} checkpoint")
    return _l3m_tower_plan(weights, L3M_ENCODER, _L3M_ENCODER_PARTS)


def l3m_decoder_plan(weights: Mapping) -> dict[str, Recipe]:
    """Our `MultimodalDecoder` key -> how to make it from the checkpoint's text decoder."""
    recipes = _l3m_tower_plan(weights, L3M_DECODER, _L3M_DECODER_PARTS)
    if not recipes:
        raise CheckpointError(
            f"no text decoder (no {L3M_DECODER}* tensors) in this {ML_L3M} checkpoint"
        )
    return recipes
