"""`aimv2 pretrain` starts as apple/ml-l3m starts (configs/aimv2/001_aimv2_hfdata.yaml): at
AIMv2-L size every parameter group's bounds, mean and std match ml-l3m's init, the expected
values computed here from PyTorch's and timm's formulas, not taken from our module."""

from __future__ import annotations

import math

from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.loop import build_pretrain_model

import numpy as np
import pytest
from mlx.utils import tree_flatten

D, DEPTH, DECODER_DEPTH, HIDDEN, VOCAB, T, PATCH_DIMS = 1024, 24, 12, 2816, 32000, 77, 588


@pytest.fixture(scope="module")
def large_init():
    """The L-size encoder + decoder's initial parameters (no forward pass), as NumPy arrays."""
    config = PretrainConfig.from_preset("large", VOCAB, T, seed=3)
    assert (config.decoder.num_hidden_layers, config.encoder.intermediate_size) == (
        DECODER_DEPTH,
        HIDDEN,
    )
    model = build_pretrain_model(config, cpu_backend=False)
    params = dict(tree_flatten(model.parameters()))
    del model
    return params


def _gather(params, keep) -> np.ndarray:
    return np.concatenate(
        [np.asarray(v, dtype=np.float64).ravel() for k, v in params.items() if keep(k)]
    )


def _qkv_thirds(params, which: str) -> np.ndarray:
    """q, k or v rows of every fused qkv (ml-l3m keeps them as three (D, D) Linears)."""
    index = "qkv".index(which)
    return np.concatenate(
        [
            np.asarray(v[index * D : (index + 1) * D]).ravel()
            for k, v in params.items()
            if k.endswith("attn.qkv.weight")
        ]
    )


def _check_uniform(values: np.ndarray, bound: float) -> None:
    """Exact bounds, reached (to 0.1%), and mean/std of U(±bound) within 6 standard errors."""
    n = values.size
    std = bound / math.sqrt(3)
    assert np.abs(values).max() <= bound
    assert np.abs(values).max() >= bound * (1 - 10 / n**0.5 if n < 1e6 else 0.999)
    assert abs(values.mean()) < 6 * std / math.sqrt(n)
    # sd of a uniform's sample std: 0.447σ/√n
    assert abs(values.std() / std - 1) < 6 * 0.45 / math.sqrt(n)


def _check_normal(values: np.ndarray, std: float) -> None:
    n = values.size
    assert abs(values.mean()) < 6 * std / math.sqrt(n)
    assert abs(values.std() / std - 1) < 6 / math.sqrt(2 * n)
    assert np.abs(values).max() > 3 * std  # a normal, not a narrow or truncated one


def xavier(fan_out: int, fan_in: int) -> float:
    """torch.nn.init.xavier_uniform_: U(±√(6 / (fan_in + fan_out)))."""
    return math.sqrt(6 / (fan_in + fan_out))


def test_patch_conv_weight_is_xavier_on_its_two_d_view(large_init):
    _check_uniform(
        _gather(large_init, lambda k: k.endswith("patchifier.proj.weight")), xavier(D, PATCH_DIMS)
    )


def test_patch_conv_bias_keeps_pytorchs_conv_default_not_zero(large_init):
    bias = _gather(large_init, lambda k: k.endswith("patchifier.proj.bias"))
    bound = 1 / math.sqrt(PATCH_DIMS)  # torch Conv2d.reset_parameters: U(±1/√fan_in)
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.95 * bound
    assert abs(bias.std() / (bound / math.sqrt(3)) - 1) < 0.15  # 1024 values


@pytest.mark.parametrize("which", list("qkv"))
def test_each_of_q_k_v_is_its_own_xavier_matrix(large_init, which):
    _check_uniform(_qkv_thirds(large_init, which), xavier(D, D))


def test_attention_output_and_swiglu_linears_are_xavier_in_both_trunks(large_init):
    _check_uniform(_gather(large_init, lambda k: k.endswith("attn.proj.weight")), xavier(D, D))
    for name in ("fc1", "fc2", "fc3"):
        _check_uniform(
            _gather(large_init, lambda k, name=name: k.endswith(f"mlp.{name}.weight")),
            xavier(HIDDEN, D),
        )


def test_norm_gains_are_one(large_init):
    gains = _gather(large_init, lambda k: "norm" in k)
    assert gains.size == (2 * DEPTH + 1 + 1 + 2 * DECODER_DEPTH + 1) * D
    assert np.all(gains == 1)


@pytest.mark.parametrize(
    "key, std",
    [
        ("encoder.preprocessor.pos_embed", 0.02),
        ("decoder.text_embedding.weight", 0.02),
        ("decoder.text_pos_embed", 0.01),
    ],
)
def test_position_and_token_tables_are_the_recipes_normals(large_init, key, std):
    _check_normal(np.asarray(large_init[key], dtype=np.float64).ravel(), std)


def test_start_vector_is_a_normal_of_std_0_02(large_init):
    cls = np.asarray(large_init["decoder.cls"], dtype=np.float64).ravel()
    assert (
        cls.shape == (D,) and abs(cls.std() / 0.02 - 1) < 0.15 and abs(cls.mean()) < 6 * 0.02 / 32
    )


def test_decoder_projection_keeps_pytorchs_linear_default(large_init):
    bound = 1 / math.sqrt(D)  # kaiming_uniform(a=√5): gain √(1/3) · √(3 / fan_in)
    _check_uniform(
        np.asarray(large_init["decoder.image_projector.weight"], dtype=np.float64).ravel(), bound
    )
    bias = np.asarray(large_init["decoder.image_projector.bias"], dtype=np.float64)
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.95 * bound


@pytest.mark.parametrize(
    "key, rows", [("decoder.text_head.weight", VOCAB), ("decoder.pixel_head.weight", PATCH_DIMS)]
)
def test_heads_are_truncated_not_clipped_normals_of_timms_variance_scaling(large_init, key, rows):
    values = np.asarray(large_init[key], dtype=np.float64)
    assert values.shape == (rows, D)
    values = values.ravel()
    # timm variance_scaling_(scale=1/(1+12), fan_in, truncated_normal):
    # σ = √(scale/fan_in)/0.8796...,
    # a standard normal truncated to (-2, 2), times σ.
    a, b = -2.0, 2.0
    mass = 0.5 * (math.erf(b / math.sqrt(2)) - math.erf(a / math.sqrt(2)))
    density = math.exp(-b * b / 2) / math.sqrt(2 * math.pi)
    truncated_std = math.sqrt(1 - 2 * b * density / mass)  # std of N(0,1) truncated to ±2
    sigma = math.sqrt(1 / (1 + DECODER_DEPTH) / D) / truncated_std
    assert np.all(np.abs(values) <= 2 * sigma * (1 + 2**-22))  # float32 rounding of ±2σ itself
    n = values.size
    assert abs(values.mean()) < 6 * sigma / math.sqrt(n)
    assert abs(values.std() / (sigma * truncated_std) - 1) < 6 / math.sqrt(n)
    near_bound = np.mean(np.abs(values) > 2 * sigma * (1 - 1e-3))
    assert near_bound < 1e-3  # clipping would pile 4.6% of the samples onto ±2σ
