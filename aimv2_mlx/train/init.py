"""A fresh encoder + decoder started as apple/ml-l3m starts them
(configs/aimv2/001_aimv2_hfdata.yaml), parameter for parameter.

- Patch conv: weight xavier-uniform on its 2-D view (D, C·p·p), as a Linear (MAE's choice;
  src/l3m/model/preprocessors/vision.py `ViTPreprocessor.init_weights`); its bias keeps
  PyTorch's Conv2d default, U(±1/√(C·p·p)) (torch/nn/modules/conv.py `reset_parameters`).
- Position table of the encoder N(0, 0.02²) (same file); RMSNorm gains 1.
- Trunk linears (q, k, v, proj, fc1, fc2, fc3, both trunks): xavier-uniform each
  (src/l3m/model/trunks/transformer.py `_init_weights`, weight_init_style xavier_uniform). The
  q, k and v projections are separate (D, D) matrices there (src/l3m/model/layers/attention.py
  `GenericAttention`), so each third of our fused qkv gets its own (D, D) bound.
- Text: token embedding N(0, 0.02²), position table N(0, 0.01²), start vector N(0, 0.02²)
  (src/l3m/model/preprocessors/vision.py `TextPreprocessor.init_weights`).
- Decoder input projection: a plain torch.nn.Linear, PyTorch's default (kaiming-uniform a=√5):
  weight and bias U(±1/√D_encoder) (torch/nn/modules/linear.py `reset_parameters`).
- Both heads: timm `variance_scaling_(scale=1/(1 + decoder depth), mode="fan_in",
  distribution="truncated_normal")` (src/l3m/model/heads/classifier.py `LinearClassifier`,
  weight_init_style fan_in_depth_scaled): σ = √(scale/fan_in)/0.87962566, a normal truncated
  to ±2σ — drawn from the truncated distribution (timm/layers/weight_init.py
  `trunc_normal_tf_`, inverse-CDF), never clipped.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

# timm/layers/weight_init.py `variance_scaling_`: the std of a standard normal truncated to
# (-2, 2); dividing by it makes the truncated samples' std √(scale / fan_in).
TRUNCATED_STD = 0.87962566103423978


def xavier_uniform_bound(fan_out: int, fan_in: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def uniform(bound: float, shape: tuple[int, ...]) -> mx.array:
    return mx.random.uniform(-bound, bound, shape)


def head_sigma(fan_in: int, decoder_depth: int) -> float:
    """σ of the heads' normal before truncation at ±2σ (their samples' std is σ·0.8796)."""
    return math.sqrt(1.0 / (1 + decoder_depth) / fan_in) / TRUNCATED_STD


def truncated_normal(sigma: float, shape: tuple[int, ...]) -> mx.array:
    """N(0, σ²) truncated to ±2σ, sampled from the truncated distribution (inverse CDF)."""
    return mx.random.truncated_normal(-2.0, 2.0, shape) * sigma


def _linear(shape: tuple[int, ...]) -> mx.array:
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    return uniform(xavier_uniform_bound(fan_out, fan_in), shape)


def _qkv(shape: tuple[int, ...]) -> mx.array:
    third = (shape[0] // 3, *shape[1:])
    return mx.concatenate([_linear(third) for _ in range(3)], axis=0)


def _rules(conv_fan_in: int, encoder_width: int, decoder_depth: int
           ) -> list[tuple[Callable[[str], bool], Callable]]:
    """(matches path, makes value from shape), first match wins; paths are PretrainModel's."""
    def ends(*suffixes):
        return lambda path: path.endswith(suffixes)

    def normal(std):
        return lambda shape: mx.random.normal(shape) * std

    def head(shape):
        return truncated_normal(head_sigma(shape[1], decoder_depth), shape)

    return [
        (ends("patchifier.proj.weight"), _linear),
        (ends("patchifier.proj.bias"), lambda shape: uniform(1.0 / math.sqrt(conv_fan_in), shape)),
        (ends("norm.weight", "norm_1.weight", "norm_2.weight"), mx.ones),
        (ends("preprocessor.pos_embed"), normal(0.02)),
        (ends("attn.qkv.weight"), _qkv),
        (ends("decoder.image_projector.weight", "decoder.image_projector.bias"),
         lambda shape: uniform(1.0 / math.sqrt(encoder_width), shape)),
        (ends("decoder.text_embedding.weight", "decoder.cls"), normal(0.02)),
        (ends("decoder.text_pos_embed"), normal(0.01)),
        (ends("decoder.pixel_head.weight", "decoder.text_head.weight"), head),
        (ends(".weight"), _linear),
    ]


def init_pretraining(model: nn.Module, seed: int) -> None:
    """Re-initialise `model` (a PretrainModel) in place as ml-l3m does, deterministically in `seed`.

    Every parameter must match a rule: a new parameter without one is an error, not a silent
    default.
    """
    mx.random.seed(seed)
    params = dict(tree_flatten(model.parameters()))
    conv = params["encoder.preprocessor.patchifier.proj.weight"]
    rules = _rules(math.prod(conv.shape[1:]), conv.shape[0], model.decoder.config.num_hidden_layers)
    new = []
    for path, value in params.items():
        make = next((make for matches, make in rules if matches(path)), None)
        if make is None:
            raise ValueError(f"no ml-l3m initialisation rule for parameter {path!r}")
        new.append((path, make(tuple(value.shape)).astype(value.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
