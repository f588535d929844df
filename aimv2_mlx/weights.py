"""Checkpoint layouts: recognise them by their keys, map them onto ours, infer the config.

Our layout is ml-aim's MLX layout (`preprocessor.patchifier.proj.weight` channels-last,
`trunk.blocks.{i}.attn.qkv.weight`, …), so ml-aim files map by identity. transformers and timm
names are rewritten by the rules below; transformers' separate q/k/v projections are fused by
name (its state dict lists them k, v, q). `load()` and `aimv2 convert` both use this module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from .config import EncoderConfig, ModelConfig, PreprocessConfig, TextConfig

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
        (r"encoder\.layers\.(\d+)\.attention\.out_proj\.weight", r"trunk.blocks.\1.attn.proj.weight"),
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file or key and the reason."""


def detect_layout(weights: dict) -> str:
    """Which layout a state dict is in, judged by its keys and shapes only."""
    for key, value in weights.items():
        if key.endswith("preprocessor.patchifier.proj.weight"):
            return ML_AIM_MLX if value.shape[-1] < value.shape[1] else ML_AIM_TORCH
    if any(k.endswith("embeddings.patch_embed.weight") for k in weights):
        return TRANSFORMERS
    if "patch_embed.proj.weight" in weights and "blocks.0.mlp.fc1_g.weight" in weights:
        return TIMM
    sample = ", ".join(sorted(weights)[:3])
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {sample})")


def to_ours(weights: dict[str, mx.array], layout: str | None = None) -> dict[str, mx.array]:
    """Rename and reshape a state dict of any supported layout into our MLX layout."""
    layout = layout or detect_layout(weights)
    out: dict[str, mx.array] = {}
    qkv_parts: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        if layout == TRANSFORMERS:
            match = _TRANSFORMERS_QKV.fullmatch(key)
            if match:
                prefix, block, part = match.groups()
                target = f"{_tower(prefix)}trunk.blocks.{block}.attn.qkv.weight"
                qkv_parts.setdefault(target, {})[part] = value
                continue
            new_key = _rename_transformers(key)
        elif layout == TIMM:
            new_key = _apply_rules(_BLOCK_RULES[TIMM], key)
        else:
            new_key = key
        if new_key is None:
            raise CheckpointError(f"unexpected tensor {key!r} in a {layout} checkpoint")
        out[new_key] = value
    for target, parts in qkv_parts.items():
        missing = {"q", "k", "v"} - parts.keys()
        if missing:
            raise CheckpointError(f"{target}: missing {sorted(missing)} projection(s)")
        out[target] = mx.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return {k: _reshape(k, v, layout) for k, v in out.items()}


def _tower(prefix: str) -> str:
    return _TRANSFORMERS_TOWERS.get(prefix, prefix)


def _rename_transformers(key: str) -> str | None:
    if key == "logit_scale":
        return "log_logit_scale"
    for theirs, ours in _TRANSFORMERS_TOWERS.items():
        if key.startswith(theirs):
            if theirs.endswith("projection."):
                return ours + key[len(theirs):]
            rest = key[len(theirs):]
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


def _reshape(key: str, value: mx.array, layout: str) -> mx.array:
    if key.endswith("patchifier.proj.weight") and layout != ML_AIM_MLX:
        return value.transpose(0, 2, 3, 1)  # torch (O, I, kH, kW) -> MLX (O, kH, kW, I)
    if key.endswith("preprocessor.pos_embed") and value.ndim == 2:
        return value[None]
    if key.endswith("log_logit_scale"):
        return value.reshape(())
    return value


def infer_config(
    weights: dict[str, mx.array],
    config_json: dict | None = None,
    preprocessor_json: dict | None = None,
    name: str = "",
) -> ModelConfig:
    """Build our config from tensor shapes, taking heads/eps/ids from any foreign config.json."""
    config_json = config_json or {}
    lit = "image_encoder.preprocessor.patchifier.proj.weight" in weights
    vision_json = config_json.get("vision_config") or config_json
    vision = _vision_config(weights, "image_encoder." if lit else "", vision_json)
    text = projection = None
    if lit:
        text = _text_config(weights, config_json.get("text_config") or {})
        projection = weights["image_projector.weight"].shape[0]
    mode = "native" if vision.is_native else "clip"
    preprocess = PreprocessConfig.for_mode(mode, vision.image_size)
    if preprocessor_json and not vision.is_native:
        preprocess = _preprocess_from_hub(preprocessor_json, preprocess)
    return ModelConfig(
        name=name,
        vision=vision,
        text=text,
        projection_dim=projection,
        max_logit_scale=float(config_json.get("max_logit_scale", 100.0)),
        preprocess=preprocess,
    )


def _vision_config(weights: dict, prefix: str, cfg: dict) -> EncoderConfig:
    proj = weights[prefix + "preprocessor.patchifier.proj.weight"]
    hidden, patch, _, channels = proj.shape
    depth = _count_blocks(weights, prefix + "trunk.blocks.")
    pos = weights.get(prefix + "preprocessor.pos_embed")
    native = pos is None
    image_size = int(cfg.get("image_size", 224)) if native else round(pos.shape[1] ** 0.5) * patch
    return EncoderConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=int(cfg.get("num_attention_heads", max(1, hidden // 128))),
        intermediate_size=weights[prefix + "trunk.blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=patch,
        image_size=image_size,
        num_channels=channels,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        is_native=native,
        use_head=(prefix + "head.cls_token") in weights,
    )


def _text_config(weights: dict, cfg: dict) -> TextConfig:
    vocab, hidden = weights["text_encoder.preprocessor.text_embedding.weight"].shape
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_count_blocks(weights, "text_encoder.trunk.blocks."),
        num_attention_heads=int(cfg.get("num_attention_heads", max(1, hidden // 128))),
        intermediate_size=weights["text_encoder.trunk.blocks.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=weights["text_encoder.preprocessor.positional_embedding"].shape[0],
        eos_token_id=int(cfg.get("eos_token_id", 49407)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
    )


def _count_blocks(weights: dict, prefix: str) -> int:
    found = {int(k[len(prefix):].split(".")[0]) for k in weights if k.startswith(prefix)}
    if not found:
        raise CheckpointError(f"no transformer blocks under {prefix!r}")
    return max(found) + 1


def _preprocess_from_hub(pre: dict, default: PreprocessConfig) -> PreprocessConfig:
    crop = pre.get("crop_size", default.size)
    size = crop.get("height", default.size) if isinstance(crop, dict) else int(crop)
    return PreprocessConfig(
        mode="clip",
        size=size,
        mean=tuple(pre.get("image_mean", default.mean)),
        std=tuple(pre.get("image_std", default.std)),
    )


def read_checkpoint(folder: Path) -> tuple[dict[str, mx.array], Path]:
    """All tensors of a folder's checkpoint, and the file used.

    safetensors (single, or sharded with an index) are preferred; a PyTorch zip pickle
    (`pytorch_model.bin`, `*.pth`, `*.pt`) is read by the restricted, torch-free reader.
    """
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {}
        for shard in shards:
            path = (folder / shard).resolve()
            if folder.resolve() not in path.parents:
                raise CheckpointError(f"{index}: shard {shard!r} points outside its folder")
            weights.update(_load_file(path))
        return weights, index
    for candidate in ("model.safetensors", "mlx_model.safetensors"):
        if (folder / candidate).exists():
            return _load_file(folder / candidate), folder / candidate
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return _load_file(files[0]), files[0]
    pickles = sorted(p for ext in ("*.bin", "*.pth", "*.pt") for p in folder.glob(ext))
    if len(pickles) == 1:
        return _load_torch_pickle(pickles[0]), pickles[0]
    raise CheckpointError(f"{folder}: no model.safetensors, sharded index or single PyTorch checkpoint found")


def _load_torch_pickle(path: Path) -> dict[str, mx.array]:
    from .convert.torch_pickle import Bfloat16Array, read_torch_checkpoint

    out = {}
    for key, value in read_torch_checkpoint(path).items():
        if isinstance(value, Bfloat16Array):
            out[key] = mx.array(value.bits).view(mx.bfloat16)
        elif hasattr(value, "dtype"):
            out[key] = mx.array(value)
        else:
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return out


def _load_file(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as exc:  # MLX raises bare RuntimeError/ValueError on bad files
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None
