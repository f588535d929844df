"""The recipe's initialisation, applied to a fresh encoder + decoder
(apple/ml-l3m, configs/aimv2/001_aimv2_hfdata.yaml).

Xavier-uniform for every trunk linear, the patch projection (as a 2-D matrix) and the image
projector; N(0, 0.02) for the encoder position table, the token embedding and the start vector;
N(0, 0.01) for the text position table; a truncated normal (std 0.0087, ±2 std) for the two
heads; zeros for biases; ones for norms (their construction default).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

HEAD_STD = 0.0087


def xavier_uniform(shape: tuple[int, ...]) -> mx.array:
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return mx.random.uniform(-bound, bound, shape)


def init_pretraining(model: nn.Module, seed: int) -> None:
    """Re-initialise `model` (with .encoder and .decoder) in place, deterministically in `seed`."""
    mx.random.seed(seed)
    new = []
    for path, value in tree_flatten(model.parameters()):
        name = path.split(".")[-1]
        if path.endswith("bias"):
            value = mx.zeros(value.shape)
        elif ".norm" in path or "_norm" in path:
            value = mx.ones(value.shape)
        elif path.endswith(("pixel_head.weight", "text_head.weight")):
            value = mx.clip(mx.random.normal(value.shape), -2.0, 2.0) * HEAD_STD
        elif name == "text_pos_embed":
            value = mx.random.normal(value.shape) * 0.01
        elif name in ("pos_embed", "cls") or path.endswith("text_embedding.weight"):
            value = mx.random.normal(value.shape) * 0.02
        elif path.endswith("weight"):
            value = xavier_uniform(value.shape)
        new.append((path, value))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
