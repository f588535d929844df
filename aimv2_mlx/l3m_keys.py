"""apple/ml-l3m's parameter names (configs/aimv2/001_aimv2_hfdata.yaml) mapped onto ours.

The model is `InSeriesMetaModels` of an image encoder and a text decoder
(src/l3m/model/meta_models.py), so every name starts `models.image_encoder.` or
`models.text_decoder.`. Against ml-aim's layout (ours) the encoder differs in three ways: the
preprocessor is a `MultiBlock` (`preprocessor.blocks.0.`), the patch conv is in torch layout,
and attention keeps q, k and v as separate Linears (src/l3m/model/layers/attention.py
`GenericAttention`), fused here in that order. The decoder's parts are renamed onto our
`MultimodalDecoder`; its trunk is the encoder's kind of trunk. Both plans are made from names
and shapes alone, before any tensor is read.
"""

from __future__ import annotations

import re
from typing import Mapping

from .weights import CheckpointError, Recipe

ML_L3M = "ml-l3m"
ENCODER = "models.image_encoder."
DECODER = "models.text_decoder."
MARKER = ENCODER + "preprocessor.blocks.0.patchifier.proj.weight"

_QKV = re.compile(r"(trunk\.blocks\.\d+\.attn)\.([qkv])_proj\.weight")
_TRUNK = re.compile(
    r"trunk\.(blocks\.\d+\.(norm_1|norm_2|attn\.proj|mlp\.fc[123])|post_trunk_norm)\.weight"
)
_ENCODER_PARTS = {
    "preprocessor.blocks.0.pos_embed": "preprocessor.pos_embed",
    "preprocessor.blocks.0.patchifier.proj.weight": "preprocessor.patchifier.proj.weight",
    "preprocessor.blocks.0.patchifier.proj.bias": "preprocessor.patchifier.proj.bias",
    "preprocessor.blocks.0.patchifier.norm.weight": "preprocessor.patchifier.norm.weight",
}
# src/l3m/model/preprocessors/multimodal.py `VisionAndTextPreprocessor`, .../vision.py
# `TextPreprocessor`; the head is a MultiBlock of two LinearClassifiers, text first.
_DECODER_PARTS = {
    "preprocessor.vision_preprocessor.module.weight": "image_projector.weight",
    "preprocessor.vision_preprocessor.module.bias": "image_projector.bias",
    "preprocessor.text_preprocessor.positional_embedding": "text_pos_embed",
    "preprocessor.text_preprocessor.cls_token": "cls",
    "preprocessor.text_preprocessor.text_embedding.weight": "text_embedding.weight",
    "head.blocks.0.linear.weight": "text_head.weight",
    "head.blocks.1.linear.weight": "pixel_head.weight",
}


def is_l3m(weights: Mapping) -> bool:
    return MARKER in weights


def _tower_plan(weights: Mapping, prefix: str, parts: dict[str, str]) -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    qkv: dict[str, dict[str, str]] = {}
    for key in weights:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        match = _QKV.fullmatch(rest)
        if match:
            qkv.setdefault(f"{match[1]}.qkv.weight", {})[match[2]] = key
        elif rest in parts:
            recipes[parts[rest]] = Recipe(
                (key,), "conv" if rest.endswith("patchifier.proj.weight") else "copy"
            )
        elif _TRUNK.fullmatch(rest):
            recipes[rest] = Recipe((key,))
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in an {ML_L3M} checkpoint")
    for target, found in qkv.items():
        missing = {"q", "k", "v"} - found.keys()
        if missing:
            raise CheckpointError(f"{prefix}{target}: missing {sorted(missing)} projection(s)")
        recipes[target] = Recipe((found["q"], found["k"], found["v"]), "qkv")
    return recipes


def encoder_plan(weights: Mapping) -> dict[str, Recipe]:
    """Our encoder key -> how to make it; decoder tensors are left out, any other refused."""
    strays = [k for k in weights if not k.startswith((ENCODER, DECODER))]
    if strays:
        raise CheckpointError(f"unexpected tensor {strays[0]!r} in an {ML_L3M} checkpoint")
    return _tower_plan(weights, ENCODER, _ENCODER_PARTS)


def decoder_plan(weights: Mapping) -> dict[str, Recipe]:
    """Our `MultimodalDecoder` key -> how to make it from the checkpoint's text decoder."""
    recipes = _tower_plan(weights, DECODER, _DECODER_PARTS)
    if not recipes:
        raise CheckpointError(
            f"no text decoder (no {DECODER}* tensors) in this {ML_L3M} checkpoint"
        )
    return recipes
