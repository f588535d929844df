"""Write an aimv2-mlx model folder in transformers' or ml-aim's PyTorch layout, without torch.

The foreign names are the converter's key map read backwards: every name the transformers
rules of `aimv2_mlx.weights` can match is put through those rules, and the ones that land on one
of our tensors are its names. The forward plan (`weights.plan`) of the names and shapes to be
written must then give back exactly our tensors and shapes, so export and convert cannot drift
apart. Tensors are streamed: read, mapped and written one at a time (`write_streaming`).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .checkpoint_io import Checkpoint
from .config import ModelConfig
from .errors import SettingError
from .safetensors_io import write_streaming
from .weights import (
    _BLOCK_RULES,
    _TRANSFORMERS_QKV,
    _TRANSFORMERS_TOWERS,
    ML_AIM_TORCH,
    TRANSFORMERS,
    CheckpointError,
    Recipe,
    detect_layout,
    ours_for_transformers_key,
    plan,
)

FORMATS = ("transformers", "ml-aim")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
_GROUP = re.compile(r"\(([^()]*)\)")


@dataclass(frozen=True)
class Foreign:
    """One tensor to write: its name and shape there, and the recipe that maps it onto ours."""

    name: str
    shape: tuple[int, ...]
    ours: str
    recipe: Recipe


def transformers_names(ours: list[str]) -> dict[str, tuple[str, ...]]:
    """Our key -> its transformers name(s), in the order its recipe takes them (q, k, v)."""
    depth = 1 + max((int(n) for key in ours for n in re.findall(r"\.(\d+)\.", key)), default=0)
    found: dict[str, dict[int, str]] = {}
    for candidate in _transformers_candidates(depth):
        key, part = ours_for_transformers_key(candidate)
        if key is None:
            continue
        slot = found.setdefault(key, {})
        if slot.get(part or 0, candidate) != candidate:
            raise CheckpointError(
                f"{key!r}: two transformers names map onto it ({slot[part or 0]!r}, {candidate!r})"
            )
        slot[part or 0] = candidate
    missing = [key for key in ours if key not in found]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} has no transformers name")
    return {key: tuple(found[key][i] for i in sorted(found[key])) for key in ours}


def _transformers_candidates(depth: int):
    """Every name the transformers rules can match, for blocks 0..depth-1 and each tower."""
    prefixes = ["", *_TRANSFORMERS_TOWERS]
    patterns = [pattern for pattern, _ in _BLOCK_RULES[TRANSFORMERS]]
    for prefix, pattern in itertools.product(prefixes, patterns):
        yield from (prefix + name for name in _instances(pattern, depth, [""]))
    yield from _instances(_TRANSFORMERS_QKV.pattern, depth, prefixes)
    for prefix in prefixes:  # the projections are a tower prefix and a bare weight
        yield prefix + "weight"
    yield "logit_scale"


def _instances(pattern: str, depth: int, prefixes: list[str]):
    """The strings a rule's regex matches: `\\d+` a block number, `.*` a tower, `a|b`, `[qkv]`."""
    pieces = _GROUP.split(pattern)
    options = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            options.append([re.sub(r"\\(.)", r"\1", piece)])
        elif piece == r"\d+":
            options.append([str(n) for n in range(depth)])
        elif piece == ".*":
            options.append(prefixes)
        elif piece.startswith("["):
            options.append(list(piece[1:-1]))
        else:
            options.append(piece.split("|"))
    return ("".join(combo) for combo in itertools.product(*options))


def foreign_plan(checkpoint: Checkpoint, fmt: str) -> list[Foreign]:
    """What to write for `fmt`, checked against the converter's forward plan of it."""
    ours = {key: ref.shape for key, ref in checkpoint.tensors.items()}
    if fmt == "transformers":
        names, layout = transformers_names(sorted(ours)), TRANSFORMERS
    elif fmt == "ml-aim":
        names, layout = {key: (key,) for key in ours}, ML_AIM_TORCH
    else:
        raise SettingError(f"--format {fmt!r}: use one of mlx, {', '.join(FORMATS)}")
    shapes = {}
    for key, theirs in names.items():
        for name in theirs:
            shapes[name] = _their_shape(key, ours[key], len(theirs), fmt)
    if detect_layout(shapes) != layout:  # as `aimv2 convert` would judge the file
        raise CheckpointError(
            f"{checkpoint.path}: a {fmt} file of this model would not be read "
            f"back as {fmt} (its patch shape is ambiguous)"
        )
    recipes = plan(shapes, layout)
    if recipes.keys() != ours.keys() or any(r.shape(shapes) != ours[k] for k, r in recipes.items()):
        raise CheckpointError(f"{checkpoint.path}: the {fmt} names do not map back onto this model")
    return [
        Foreign(name, shapes[name], key, recipes[key])
        for key in sorted(ours)
        for name in recipes[key].sources
    ]


def _their_shape(key: str, shape: tuple[int, ...], parts: int, fmt: str) -> tuple[int, ...]:
    """A tensor's shape in PyTorch: conv weights (O, I, kH, kW), transformers' position table
    an `nn.Embedding` (N, D), q/k/v the thirds of our fused rows."""
    if key.endswith("patchifier.proj.weight"):
        return (shape[0], shape[3], shape[1], shape[2])
    if fmt == "transformers" and key.endswith("preprocessor.pos_embed"):
        return shape[1:]
    if parts > 1:
        return (shape[0] // parts, *shape[1:])
    return shape


def write_tensors(checkpoint: Checkpoint, foreign: list[Foreign], path: Path) -> int:
    """Stream the tensors into one safetensors file; our tensor of a q/k/v split is read once."""
    cache: dict[str, mx.array] = {}

    def produce(name: str) -> mx.array:
        item = by_name[name]
        if item.ours not in cache:
            cache.clear()
            cache[item.ours] = checkpoint.tensors[item.ours].load()
        value = cache[item.ours]
        if item.recipe.op == "qkv":
            index = item.recipe.sources.index(name)
            rows = item.shape[0]
            value = value[index * rows : (index + 1) * rows]
        elif item.recipe.op == "conv":
            value = value.transpose(0, 3, 1, 2)
        return value.reshape(item.shape)

    by_name = {item.name: item for item in foreign}
    specs = [(item.name, item.shape, checkpoint.tensors[item.ours].dtype) for item in foreign]
    return write_streaming(path, specs, produce, metadata={"format": "pt"})


def transformers_config(config: ModelConfig, dtype: str) -> dict:
    """`config.json` for `Aimv2VisionModel` (or `Aimv2Model` with the text tower): the fields of
    transformers' `Aimv2VisionConfig` / `Aimv2TextConfig` / `Aimv2Config`."""
    v = config.vision
    vision = {
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "rms_norm_eps": v.rms_norm_eps,
        "hidden_act": "silu",
        "qkv_bias": False,
        "mlp_bias": False,
        "use_head": v.use_head,
        "is_native": v.is_native,
    }
    if not config.is_lit:
        return {
            "architectures": ["Aimv2VisionModel"],
            "model_type": "aimv2_vision_model",
            **vision,
            "dtype": dtype,
        }
    t = config.text
    text = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "eos_token_id": t.eos_token_id,  # `Aimv2TextModel` pools at its first occurrence
        "pad_token_id": t.pad_token_id,
        "rms_norm_eps": t.rms_norm_eps,
        "hidden_act": "silu",
        "qkv_bias": False,
        "mlp_bias": False,
    }
    return {
        "architectures": ["Aimv2Model"],
        "model_type": "aimv2",
        "vision_config": {"model_type": "aimv2_vision_model", **vision},
        "text_config": {"model_type": "aimv2_text_model", **text},
        "projection_dim": config.projection_dim,
        "max_logit_scale": config.max_logit_scale,
        "dtype": dtype,
    }


def write_format(checkpoint: Checkpoint, config: ModelConfig, folder: Path, fmt: str) -> int:
    """The weights, configs and (LiT) tokenizer files of `fmt` into `folder`; bytes of tensors."""
    foreign = foreign_plan(checkpoint, fmt)
    tokenizer = (
        [n for n in TOKENIZER_FILES if (checkpoint.folder / n).is_file()] if config.is_lit else []
    )
    if config.is_lit and not (
        "tokenizer.json" in tokenizer or {"vocab.json", "merges.txt"} <= set(tokenizer)
    ):
        raise CheckpointError(
            f"{checkpoint.folder}: a LiT model is exported with its tokenizer files "
            "(tokenizer.json, or vocab.json + merges.txt), and this folder has none"
        )
    total = write_tensors(checkpoint, foreign, folder / "model.safetensors")
    hub_config = transformers_config(config, checkpoint.tensors[foreign[0].ours].dtype)
    if fmt == "ml-aim":  # ml-aim builds by model name; the sizes are for readers like ours
        hub_config = {
            k: v for k, v in hub_config.items() if k not in ("architectures", "model_type")
        }
    _write_json(folder / "config.json", hub_config)
    _write_json(folder / "preprocessor_config.json", config.preprocess.to_hub())
    for name in tokenizer:
        shutil.copy2(checkpoint.folder / name, folder / name)
    return total


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
