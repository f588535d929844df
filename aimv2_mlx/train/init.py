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

`L3mStart` instead starts a run from an ml-l3m checkpoint (`aimv2 pretrain --init-from`): its
encoder and decoder weights, and its AdamW moments and step where every one of ours has them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoint_io import TensorRef
from ..config import DecoderConfig, EncoderConfig, check_tower, default_heads
from ..decoder import MultimodalDecoder
from ..encoder import VisionEncoder
from ..errors import SettingError
from ..l3m import open_training_checkpoint
from ..model import expected_parameters
from ..weights import (
    ML_L3M,
    CheckpointError,
    _count_blocks,
    check_tensors,
    is_l3m,
    l3m_decoder_plan,
    l3m_encoder_plan,
    shape_of,
)
from .step import PretrainModel

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


def _rules(
    conv_fan_in: int, encoder_width: int, decoder_depth: int
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
        (
            ends("decoder.image_projector.weight", "decoder.image_projector.bias"),
            lambda shape: uniform(1.0 / math.sqrt(encoder_width), shape),
        ),
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


class L3mStart:
    """An ml-l3m checkpoint opened to start a run from: names, shapes and plans, no tensor read yet.

    With `with_optimizer` (and a file whose optimizer state covers every one of our parameters,
    all at one step), the run continues at that step with AdamW's moments (`exp_avg`,
    `exp_avg_sq` of ml-l3m's src/l3m/optim/adamw_lh.py `AdamLH`, mapped like the weights), so
    bias correction and the schedule go on from there; otherwise it starts at step 0.
    """

    def __init__(self, path: str | os.PathLike, with_optimizer: bool = True):
        self.path = Path(path).expanduser()
        checkpoint = open_training_checkpoint(self.path)
        if not is_l3m(checkpoint.model):
            raise CheckpointError(
                f"{self.path}: not an {ML_L3M} AIMv2 checkpoint (no {ML_L3M} encoder tensors)"
            )
        self.tensors = checkpoint.model
        self.refused = checkpoint.refused
        try:
            self.recipes = {
                **{"encoder." + k: r for k, r in l3m_encoder_plan(self.tensors).items()},
                **{"decoder." + k: r for k, r in l3m_decoder_plan(self.tensors).items()},
            }
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        self.shapes = {key: recipe.shape(self.tensors) for key, recipe in self.recipes.items()}
        self.moments, self.step, self.why_not = {}, 0, None
        if with_optimizer:
            self.moments, self.step, self.why_not = self._moments(checkpoint.optimizer)

    def _moments(self, optimizer) -> tuple[dict, int, str | None]:
        """({source name: (exp_avg, exp_avg_sq)}, step, None), or ({}, 0, why not)."""
        if optimizer is None:
            return {}, 0, "the file has no optimizer state"
        state, moments, steps = optimizer["state"], {}, set()
        for name in {source for recipe in self.recipes.values() for source in recipe.sources}:
            entry = state.get(name)
            if not isinstance(entry, dict) or not all(
                shape_of(entry.get(m, ())) == shape_of(self.tensors[name])
                for m in ("exp_avg", "exp_avg_sq")
            ):
                return {}, 0, f"no AdamW moments of {self.tensors[name].shape} for {name!r}"
            step = entry.get("step")
            step = int(np.asarray(step.numpy()).reshape(-1)[0]) if hasattr(step, "numpy") else step
            if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                return (
                    {},
                    0,
                    f"the optimizer step of {name!r} is {step!r}, not a positive whole number",
                )
            moments[name] = (entry["exp_avg"], entry["exp_avg_sq"])
            steps.add(step)
        if len(steps) != 1:
            return (
                {},
                0,
                f"its parameters are at different optimizer steps ({min(steps)}..{max(steps)})",
            )
        return moments, steps.pop(), None

    def sizes(
        self, heads: int | None = None, decoder_heads: int | None = None
    ) -> tuple[EncoderConfig, DecoderConfig]:
        """The encoder and decoder the file holds (heads are not in a checkpoint: given, or the
        AIMv2 family's for that width)."""
        shapes = self.shapes
        width, patch, _, channels = shapes["encoder.preprocessor.patchifier.proj.weight"]
        vocab, decoder_width = shapes["decoder.text_embedding.weight"]
        try:
            encoder = EncoderConfig(
                hidden_size=width,
                num_hidden_layers=_count_blocks(shapes, "encoder.trunk.blocks."),
                num_attention_heads=heads or default_heads(width),
                intermediate_size=shapes["encoder.trunk.blocks.0.mlp.fc1.weight"][0],
                patch_size=patch,
                image_size=round(shapes["encoder.preprocessor.pos_embed"][1] ** 0.5) * patch,
                num_channels=channels,
            )
            decoder = DecoderConfig(
                hidden_size=decoder_width,
                num_hidden_layers=_count_blocks(shapes, "decoder.trunk.blocks."),
                num_attention_heads=decoder_heads or default_heads(decoder_width),
                intermediate_size=shapes["decoder.trunk.blocks.0.mlp.fc1.weight"][0],
                vocab_size=vocab,
                context_length=shapes["decoder.text_pos_embed"][0] - 1,
            )
            check_tower("encoder", encoder, ("patch_size", "image_size", "num_channels"))
            check_tower("decoder", decoder, ("vocab_size", "context_length"))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(
                f"{self.path}: not a model this project can build ({exc})"
            ) from None
        return encoder, decoder

    def config(self, base, heads: int | None = None, decoder_heads: int | None = None):
        """`base` (a PretrainConfig) with the file's sizes."""
        encoder, decoder = self.sizes(heads, decoder_heads)
        return dataclasses.replace(base, preset="l3m", encoder=encoder, decoder=decoder)

    def check(self, config, steps: int | None = None) -> None:
        """Refuse a run config (a PretrainConfig) the file does not fit, or a run too short to
        continue from its step; the model is built only lazily (nothing allocated)."""
        enc = config.encoder
        model = PretrainModel(
            VisionEncoder(enc),
            MultimodalDecoder(
                config.decoder, enc.hidden_size, enc.patch_size**2 * enc.num_channels
            ),
        )
        check_tensors(expected_parameters(model), self.shapes, self.path)
        if steps is not None and self.step >= steps:
            raise SettingError(
                f"{self.path}: its optimizer is at step {self.step}, so the run continues from "
                f"there; give --steps above {self.step}, or start a new schedule from its weights "
                "alone (--init-weights-only)"
            )

    def apply(self, model: nn.Module, optimizer) -> str:
        """Weights (and moments) into `model`/`optimizer` (initialised); returns what was taken."""
        check_tensors(expected_parameters(model), self.shapes, self.path)

        def read(moment: int | None):
            if moment is None:
                return lambda name: _load(self.tensors[name], self.path)
            return lambda name: _load(self.moments[name][moment], self.path)

        model.load_weights(
            [
                (key, recipe.build(read(None)).astype(mx.float32))
                for key, recipe in self.recipes.items()
            ]
        )
        taken = "encoder + decoder weights"
        if self.moments:
            state = []
            for key, value in tree_flatten(optimizer.state):
                head, _, leaf = key.rpartition(".")
                param = head.split(".", 2)[2] if head.count(".") >= 2 else ""
                if leaf == "step" and head.count(".") == 1:
                    value = mx.array(self.step, dtype=value.dtype)
                elif leaf in ("m", "v") and param in self.recipes:
                    value = self.recipes[param].build(read("mv".index(leaf))).astype(value.dtype)
                state.append((key, value))
            optimizer.state = tree_unflatten(state)
            taken += (
                f", AdamW moments at step {self.step} (the run continues from step {self.step})"
            )
        elif self.why_not is not None:
            taken += f" (optimizer state not taken: {self.why_not}; the run starts at step 0)"
        if self.refused:
            more = f" and {len(self.refused) - 3} more" if len(self.refused) > 3 else ""
            named = ", ".join(self.refused[:3])
            taken += f"; its other entries' globals were refused, not run: {named}{more}"
        mx.eval(model.parameters(), optimizer.state)
        return f"started from {self.path}: {taken}"


def _load(tensor, path: Path) -> mx.array:
    return TensorRef(tensor.shape, tensor.dtype, path, tensor.numpy).load()
