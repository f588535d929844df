"""The LiT model being tuned: Apple's LiT architecture around the locked encoder's weights.

Trained: the whole text tower, the image side's attention-pool head and both projections, and the
logit scale. Locked (frozen, never updated): the encoder's patchifier, positions and trunk — the
parts whose tokens the run caches.
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .. import cpu
from ..config import ModelConfig, TextConfig
from ..model import build
from .config import LitConfig


def vision_of(encoder):
    """The image encoder of a model (a LiT's image tower, or the encoder itself)."""
    return encoder.image_encoder if encoder.config.is_lit else encoder


def locked_weights(encoder) -> dict[str, mx.array]:
    """The encoder's weights that LiT-tuning locks: everything but an attention-pool head."""
    return {
        k: v for k, v in tree_flatten(vision_of(encoder).parameters()) if not k.startswith("head.")
    }


def model_config(
    config: LitConfig, preprocess, name: str, source: dict | None = None
) -> ModelConfig:
    vision = dataclasses.replace(config.vision, use_head=True)
    return ModelConfig(
        name=name,
        vision=vision,
        text=config.text,
        projection_dim=config.projection_dim,
        preprocess=preprocess,
        source=source or {},
    )


def build_lit(
    config: LitConfig,
    locked: dict[str, mx.array],
    preprocess,
    name: str = "lit",
    cpu_backend: bool = True,
):
    """A LiT with the locked weights in its image encoder, the rest initialised from the seed, and
    only the trained parts trainable."""
    model = build(model_config(config, preprocess, name))
    if cpu_backend and cpu.on_cpu():
        cpu.apply(model, training=True)
    model.image_encoder.load_weights(list(locked.items()), strict=False)
    init_trained(model, config.seed)
    model.image_encoder.preprocessor.freeze()
    model.image_encoder.trunk.freeze()
    mx.eval(model.parameters())
    return model


def init_trained(model, seed: int) -> None:
    """CLIP's text-tower init (openai/CLIP `clip/model.py`, `initialize_parameters`): token
    embedding N(0, 0.02), positions N(0, 0.01); the pooling query N(0, 0.02); matrices
    Xavier-uniform as the AIMv2 trunks (apple/ml-l3m); norms 1, biases 0; scale log(1/0.07)."""
    trained = {
        k: v
        for k, v in tree_flatten(model.parameters())
        if not k.startswith(("image_encoder.trunk.", "image_encoder.preprocessor."))
    }
    keys = mx.random.split(mx.random.key(seed), len(trained))
    values = {}
    for key, (name, value) in zip(keys, sorted(trained.items()), strict=True):
        if name.endswith("positional_embedding"):
            values[name] = 0.01 * mx.random.normal(value.shape, key=key)
        elif name.endswith(("text_embedding.weight", "cls_token")):
            values[name] = 0.02 * mx.random.normal(value.shape, key=key)
        elif name == "log_logit_scale":
            values[name] = mx.array(math.log(1 / 0.07))
        elif name.endswith(".bias"):
            values[name] = mx.zeros(value.shape)
        elif value.ndim == 1:
            values[name] = mx.ones(value.shape)
        else:
            bound = math.sqrt(6 / (value.shape[0] + value.shape[-1]))
            values[name] = mx.random.uniform(-bound, bound, value.shape, key=key)
    model.update(tree_unflatten(list(values.items())))


def trained_weights(model) -> dict[str, mx.array]:
    """What a checkpoint holds: the trainable parameters, flat."""
    return dict(tree_flatten(model.trainable_parameters()))


def text_config(config: LitConfig, tokenizer) -> TextConfig:
    """The text tower's vocabulary and its pooling (EOS) and pad ids, from the run's tokenizer."""
    return dataclasses.replace(
        config.text,
        vocab_size=tokenizer.vocab_size,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
