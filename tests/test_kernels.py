"""The CPU backend (aimv2_mlx.cpu: kernels, modules) against the plain MLX layers.

Every fast path is compared, forward and gradient, with MLX's own ops (mx.exp, nn.silu,
mx.softmax, mx.fast.scaled_dot_product_attention) or with float64 NumPy, on tiny shapes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import aimv2_mlx
from aimv2_mlx import cpu
from aimv2_mlx.config import DecoderConfig
from aimv2_mlx.cpu import kernels, modules, settings
from aimv2_mlx.decoder import MultimodalDecoder
from aimv2_mlx.layers import prefix_mask

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from .conftest import tiny_config


def _np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


# --- exp -------------------------------------------------------------------------------------


def test_fast_exp_matches_exact_exp_over_the_whole_float32_range():
    x = np.linspace(-87.3, 88.3, 400_001, dtype=np.float32)
    ours = _np(kernels.fast_exp(mx.array(x)))
    assert _rel(ours, np.exp(x.astype(np.float64))) <= 1e-6  # measured 2.7e-7


def test_fast_exp_matches_mx_exp():
    # MLX's own CPU exp is itself off by up to ~4e-6 at large |x|, so the 1e-6 bound holds
    # where mx.exp is accurate; the whole range is checked against float64 above.
    x = np.linspace(-10.0, 10.0, 100_001, dtype=np.float32)
    assert _rel(_np(kernels.fast_exp(mx.array(x))), _np(mx.exp(mx.array(x)))) <= 1e-6
    wide = np.linspace(-87.0, 88.0, 100_001, dtype=np.float32)
    assert _rel(_np(kernels.fast_exp(mx.array(wide))), _np(mx.exp(mx.array(wide)))) <= 5e-6


def test_fast_exp_edges():
    x = mx.array([-math.inf, math.inf, math.nan, -1e30, 1e30, -200.0, 200.0, 0.0, -0.0, 1.0])
    out = _np(kernels.fast_exp(x))
    assert out[0] == 0.0 and out[3] == 0.0 and out[5] == 0.0
    assert np.isposinf(out[1]) and np.isposinf(out[4]) and np.isposinf(out[6])
    assert np.isnan(out[2])
    assert out[7] == 1.0 and out[8] == 1.0
    assert abs(out[9] - math.e) / math.e < 3e-7


def test_fast_exp_strided_and_broadcast_inputs():
    base = mx.random.normal((64, 48), key=mx.random.key(1)) * 10
    strided = base.T[::2]
    assert _rel(_np(kernels.fast_exp(strided)), np.exp(_np(strided).astype(np.float64))) <= 1e-6


# --- SwiGLU ----------------------------------------------------------------------------------


def test_silu_mul_matches_nn_silu():
    key_g, key_u = mx.random.split(mx.random.key(2))
    gate = mx.random.normal((257, 96), key=key_g) * 6
    up = mx.random.normal((257, 96), key=key_u)
    expected = _np(nn.silu(gate) * up)
    got = _np(kernels.silu_mul(gate, up))
    assert np.max(np.abs(got - expected) / (np.abs(expected) + 1e-6)) <= 2e-6


def test_silu_mul_extreme_gates():
    gate = mx.array(
        [-1e4, -150.0, -89.0, -88.0, -87.0, -20.0, -1.0, 0.0, 1.0, 20.0, 87.0, 88.0, 150.0, 1e4]
    )
    up = mx.full(gate.shape, 1.5)
    expected = _np(nn.silu(gate) * up)
    got = _np(kernels.silu_mul(gate, up))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)


def _silu_grads(fn, gate, up, cotangent):
    return [
        _np(g) for g in mx.grad(lambda g, u: (fn(g, u) * cotangent).sum(), argnums=(0, 1))(gate, up)
    ]


@pytest.mark.parametrize("compiled", [False, True])
def test_silu_mul_gradients_match_nn_silu(compiled):
    key_g, key_u, key_c = mx.random.split(mx.random.key(13), 3)
    gate = mx.random.normal((129, 64), key=key_g) * 6
    up = mx.random.normal((129, 64), key=key_u)
    cotangent = mx.random.normal((129, 64), key=key_c)
    fast = kernels.silu_mul if not compiled else mx.compile(lambda g, u: kernels.silu_mul(g, u))
    got = _silu_grads(fast, gate, up, cotangent)
    expected = _silu_grads(lambda g, u: nn.silu(g) * u, gate, up, cotangent)
    for a, b in zip(got, expected, strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


def test_silu_mul_gradients_at_extreme_gates_are_finite_and_exact():
    gate = mx.array(
        [-1e4, -150.0, -89.0, -88.0, -87.0, -20.0, -1.0, 0.0, 1.0, 20.0, 87.0, 88.0, 150.0, 1e4]
    )
    up = mx.full(gate.shape, 1.5)
    ones = mx.ones(gate.shape)
    got = _silu_grads(kernels.silu_mul, gate, up, ones)
    expected = _silu_grads(lambda g, u: nn.silu(g) * u, gate, up, ones)
    for a, b in zip(got, expected, strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-30)


# --- attention -------------------------------------------------------------------------------


def _qkv(B=2, H=3, N=19, d=8, seed=6):
    keys = mx.random.split(mx.random.key(seed), 3)
    return [mx.random.normal((B, H, N, d), key=k) for k in keys]


def _causal_bool(n):
    idx = mx.arange(n)
    return idx[None, :] <= idx[:, None]


def _mask(kind: str, B: int, N: int):
    if kind == "none":
        return None
    if kind == "additive":
        return mx.random.normal((B, 1, N, N), key=mx.random.key(7))
    if kind == "boolean":
        mask = mx.random.uniform(shape=(B, 1, N, N), key=mx.random.key(8)) < 0.6
        return mask | mx.eye(N, dtype=mx.bool_)  # every query sees at least itself
    if kind == "causal":
        return "causal"
    return prefix_mask(mx.array([3, 11][:B]), N)


KINDS = ["none", "additive", "boolean", "causal", "prefix"]


@pytest.mark.parametrize("kind", KINDS)
def test_attention_matches_sdpa(kind):
    q, k, v = _qkv()
    B, _H, N, d = q.shape
    scale = d**-0.5
    mask = _mask(kind, B, N)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    got = kernels.attention(q, k, v, scale, modules.additive(mask, N, mx.float32))
    np.testing.assert_allclose(_np(got), _np(expected), rtol=1e-5, atol=2e-6)


def _plain_qkv_attention(qkv, heads, scale, mask):
    B, N, three_d = qkv.shape
    D = three_d // 3
    q, k, v = qkv.reshape(B, N, 3, heads, D // heads).transpose(2, 0, 3, 1, 4)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(B, N, D)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_qkv_attention_gradient_matches_sdpa(kind, compiled):
    B, N, D, H = 2, 19, 24, 3
    qkv = mx.random.normal((B, N, 3 * D), key=mx.random.key(14)) * 2
    cotangent = mx.random.normal((B, N, D), key=mx.random.key(15))
    mask = _mask(kind, B, N)
    additive = modules.additive(mask, N, mx.float32)

    def fast(x):
        return (kernels.qkv_attention(x, H, 0.3, additive) * cotangent).sum()

    def plain(x):
        return (_plain_qkv_attention(x, H, 0.3, mask) * cotangent).sum()

    grad = mx.grad(fast)
    got = _np((mx.compile(grad) if compiled else grad)(qkv))
    expected = _np(mx.grad(plain)(qkv))
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
    assert abs(fast(qkv).item() - plain(qkv).item()) <= 1e-5 * abs(plain(qkv).item())


def test_qkv_attention_gradient_with_large_logits_and_masked_rows():
    """Logits of ~1e3 (one key takes all the weight) and -inf entries stay exact and finite."""
    B, N, D, H = 1, 12, 8, 1
    qkv = mx.random.normal((B, N, 3 * D), key=mx.random.key(16)) * 12
    mask = prefix_mask(mx.array([1]), N)
    cotangent = mx.random.normal((B, N, D), key=mx.random.key(17))
    additive = modules.additive(mask, N, mx.float32)
    got = _np(
        mx.grad(lambda x: (kernels.qkv_attention(x, H, 1.0, additive) * cotangent).sum())(qkv)
    )
    expected = _np(
        mx.grad(lambda x: (_plain_qkv_attention(x, H, 1.0, mask) * cotangent).sum())(qkv)
    )
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_qkv_attention_on_row_blocks_equals_whole_sequence_forward_and_gradient():
    B, N, D, H = 2, 21, 24, 3
    qkv = mx.random.normal((B, N, 3 * D), key=mx.random.key(9))
    cotangent = mx.random.normal((B, N, D), key=mx.random.key(18))
    mask = modules.additive(prefix_mask(mx.array([4, 9]), N), N, mx.float32)

    def whole(x):
        return kernels.qkv_attention(x, H, 0.3, mask)

    def rows(x):
        blocks = [
            kernels.qkv_attention(x[:, a:b], H, 0.3, mask[..., a:b, :], kv=x)
            for a, b in ((0, 8), (8, N))
        ]
        return mx.concatenate(blocks, axis=1)

    # Equal to float32 rounding: BLAS may block a GEMM differently for each shape (measured up
    # to 3e-7 on values near 2 with OpenBLAS on an AVX-512 machine).
    np.testing.assert_allclose(_np(rows(qkv)), _np(whole(qkv)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _np(whole(qkv)), _np(_plain_qkv_attention(qkv, H, 0.3, mask)), rtol=1e-5, atol=2e-6
    )
    grads = [_np(mx.grad(lambda x, f=f: (f(x) * cotangent).sum())(qkv)) for f in (rows, whole)]
    assert np.max(np.abs(grads[0] - grads[1])) <= 1e-5 * np.max(np.abs(grads[1]))


def _tiny_decoder() -> MultimodalDecoder:
    config = DecoderConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        context_length=6,
    )
    return MultimodalDecoder(config, encoder_dims=24, patch_dims=12)


# --- cross-entropy ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: logits in the hundreds, near one-hot
def test_cross_entropy_matches_mlx_forward_and_gradient(scale):
    logits = mx.random.normal((3, 7, 50), key=mx.random.key(30)) * scale
    targets = mx.random.randint(0, 50, (3, 7), key=mx.random.key(31))
    weights = mx.random.uniform(shape=(3, 7), key=mx.random.key(32))

    def loss(ce):
        return lambda x: (ce(x) * weights).sum()

    def plain(x):
        return nn.losses.cross_entropy(x, targets, reduction="none")

    def fast(x):
        return kernels.cross_entropy(x, targets)

    assert _rel(_np(fast(logits)), _np(plain(logits))) <= 1e-5
    for compile_ in (False, True):
        grad = mx.grad(loss(fast))
        got = mx.compile(grad)(logits) if compile_ else grad(logits)
        expected = mx.grad(loss(plain))(logits)
        assert np.max(np.abs(_np(got) - _np(expected))) <= 1e-6


def test_cross_entropy_with_masked_out_logits():
    logits = mx.random.normal((2, 4, 9), key=mx.random.key(33))
    logits = mx.where(mx.arange(9) >= 6, -math.inf, logits)  # three classes can never win
    targets = mx.array([[0, 5, 2, 1], [3, 4, 0, 5]])
    got = kernels.cross_entropy(logits, targets)
    expected = nn.losses.cross_entropy(logits, targets, reduction="none")
    assert _rel(_np(got), _np(expected)) <= 1e-5
    gradient = _np(mx.grad(lambda x: kernels.cross_entropy(x, targets).sum())(logits))
    assert np.all(np.isfinite(gradient)) and np.all(gradient[..., 6:] == 0)


def test_the_cpu_decoder_uses_the_fast_cross_entropy_and_remove_restores_mlxs():
    decoder = _tiny_decoder()
    cpu.apply(decoder, streams=())
    assert type(decoder) is modules.CPUMultimodalDecoder
    logits = mx.random.normal((2, 3, 50), key=mx.random.key(34))
    targets = mx.array([[1, 2, 3], [4, 5, 6]])
    plain = nn.losses.cross_entropy(logits, targets, reduction="none")
    assert _rel(_np(decoder.token_losses(logits, targets)), _np(plain)) <= 1e-5
    cpu.remove(decoder)
    assert type(decoder) is MultimodalDecoder


# --- whole encoder ---------------------------------------------------------------------------


@pytest.fixture
def tiny_model():
    model = aimv2_mlx.build(tiny_config(depth=3))
    # Non-trivial weights (norm scales around 1, not all ones) so that errors would show.
    keys = iter(mx.random.split(mx.random.key(10), 64))
    new = []
    for name, value in tree_flatten(model.parameters()):
        fan_in = value.shape[-1] if value.ndim > 1 else 1
        scale = 0.2 if value.ndim == 1 else fan_in**-0.5
        new.append(
            (
                name,
                mx.random.normal(value.shape, key=next(keys)) * scale
                + (1.0 if value.ndim == 1 else 0.0),
            )
        )
    model.load_weights(new)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def pixels():
    return mx.random.normal((4, 56, 56, 3), key=mx.random.key(11))


def _forward(model, pixels, prefix=None):
    tokens, features = model.forward_features(pixels, feature_blocks=(0, -1), prefix_lengths=prefix)
    mx.eval(tokens, features)
    return [_np(tokens)] + [_np(f) for f in features]


def _close(got, expected):  # raw block outputs reach |x| ~ 5: relative to the scale
    return np.max(np.abs(got - expected)) <= 1e-5 * max(1.0, np.max(np.abs(expected)))


def test_apply_swaps_every_piece_and_remove_restores_the_plain_classes(tiny_model):
    plain = {name: type(m) for name, m in tiny_model.named_modules()}
    cpu.apply(tiny_model, streams=())
    swapped = {name: type(m) for name, m in tiny_model.named_modules()}
    assert all(swapped[n] is modules.SWAPS[plain[n]] for n in plain if plain[n] in modules.SWAPS)
    assert {
        modules.CPUAttention,
        modules.CPUSwiGLU,
        modules.CPUBlock,
        modules.CPUTransformer,
    } <= set(swapped.values())
    assert all(swapped[n] is plain[n] for n in plain if plain[n] not in modules.SWAPS)
    assert tree_flatten(tiny_model.parameters())  # still only arrays: streams are no parameters
    cpu.remove(tiny_model)
    assert {name: type(m) for name, m in tiny_model.named_modules()} == plain


@pytest.mark.parametrize("prefix", [None, [2, 7, 16, 1]])
def test_encoder_with_cpu_backend_matches_the_plain_layers(tiny_model, pixels, prefix):
    prefix = None if prefix is None else mx.array(prefix)
    reference = _forward(tiny_model, pixels, prefix)  # nn.silu + mx.fast SDPA
    fast = _forward(cpu.apply(tiny_model, streams=()), pixels, prefix)
    for got, expected in zip(fast, reference, strict=True):
        assert _close(got, expected)


@pytest.mark.parametrize("batch", [4, 3, 1])  # 4: images per stream; 3 and 1: token blocks
@pytest.mark.parametrize("prefix", [False, True])
def test_split_over_streams_matches_single_stream(tiny_model, batch, prefix, monkeypatch):
    images = mx.random.normal((batch, 56, 56, 3), key=mx.random.key(12))
    lengths = mx.array([5, 1, 12, 3][:batch]) if prefix else None
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    monkeypatch.setattr(modules, "MIN_SPLIT_ROWS", 1)
    whole = _forward(cpu.apply(tiny_model, streams=()), images, lengths)
    cpu.apply(tiny_model, streams=streams)
    assert modules.split_plan(tiny_model.preprocessor(images), streams) is not None
    split = _forward(tiny_model, images, lengths)
    # Splitting changes GEMM row counts, and OpenBLAS may block (and so sum) differently for
    # each row count (not bit-identical on an AVX-512 Zen 5 machine even for whole images),
    # so allow float32 rounding, relative to the scale.
    for got, expected in zip(split, whole, strict=True):
        assert _close(got, expected)


@pytest.mark.parametrize("batch", [4, 3])
def test_encoder_gradients_with_cpu_backend_and_split_match_the_plain_layers(
    tiny_model, batch, monkeypatch
):
    images = mx.random.normal((batch, 56, 56, 3), key=mx.random.key(19))
    lengths = mx.array([5, 1, 12, 3][:batch])
    monkeypatch.setattr(modules, "MIN_SPLIT_ROWS", 1)

    def loss(params):
        tiny_model.update(params)
        return (tiny_model(images, prefix_lengths=lengths) ** 2).mean()

    params = tiny_model.trainable_parameters()
    expected = tree_flatten(mx.grad(loss)(params))
    cpu.apply(tiny_model, streams=[mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)], training=True)
    got = dict(tree_flatten(mx.grad(loss)(params)))
    for name, value in expected:
        assert _close(_np(got[name]), _np(value)), name


def test_every_linear_layer_becomes_a_cpu_linear_and_only_those_outside_a_trunk_split_rows():
    decoder = _tiny_decoder()
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    cpu.apply(decoder, streams=streams)
    linears = {name: m for name, m in decoder.named_modules() if isinstance(m, nn.Linear)}
    assert linears and all(type(m) is modules.CPULinear for m in linears.values())
    split = {name for name, m in linears.items() if m.streams}
    assert split == {"image_projector", "pixel_head", "text_head"}
    assert not any(m.row_order_gradient for m in linears.values())  # for inference
    cpu.apply(decoder, streams=streams, training=True)
    assert all(m.row_order_gradient for m in linears.values())
    cpu.remove(decoder)
    assert not any(isinstance(m, modules.CPULinear) for _, m in decoder.named_modules())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 24), (11, 24)])
def test_linear_kernel_matches_the_plain_layer_and_lays_out_its_weight_gradient_like_the_weight(
    bias, shape
):
    layer = nn.Linear(24, 40, bias=bias)
    x = mx.random.normal(shape, key=mx.random.key(27))
    cotangent = mx.random.normal((*shape[:-1], 40), key=mx.random.key(28)) * 1e3

    def loss(params, x, call):
        layer.update(params)
        return (call(x) * cotangent).sum()

    def kernel(x):
        return kernels.linear(x, layer["weight"], layer.get("bias"))

    params = layer.trainable_parameters()
    expected = mx.grad(loss, argnums=(0, 1))(params, x, layer)
    got = mx.grad(loss, argnums=(0, 1))(params, x, kernel)
    assert _close(_np(kernel(x)), _np(layer(x)))
    for (name, g), (_, e) in zip(tree_flatten(got), tree_flatten(expected), strict=True):
        assert _close(_np(g), _np(e)), name
    weight_gradient = memoryview(got[0]["weight"])
    assert weight_gradient.strides == (24 * 4, 4)  # row order, as the weight


def test_cpu_linear_defers_to_the_plain_layer_outside_float32():
    layer = nn.Linear(8, 4)
    layer.set_dtype(mx.bfloat16)
    x = mx.random.normal((2, 5, 8), key=mx.random.key(29)).astype(mx.bfloat16)
    expected = _np(layer(x).astype(mx.float32))
    cpu.apply(layer, streams=())
    assert type(layer) is modules.CPULinear
    assert np.array_equal(_np(layer(x).astype(mx.float32)), expected)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("batch", [4, 3])  # 4: images per stream; 3: token blocks
def test_row_split_linear_matches_the_plain_layer_forward_and_gradient(batch, training):
    layer = nn.Linear(24, 40)
    x = mx.random.normal((batch, 10, 24), key=mx.random.key(21))
    cotangent = mx.random.normal((batch, 10, 40), key=mx.random.key(22))

    def loss(params, x):
        layer.update(params)
        return (layer(x) * cotangent).sum()

    params = layer.trainable_parameters()
    expected = [layer(x)] + [g for _, g in tree_flatten(mx.grad(loss, argnums=(0, 1))(params, x))]
    cpu.apply(layer, streams=[mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)], training=training)
    assert type(layer) is modules.CPULinear and layer.row_order_gradient == training
    gradients = mx.grad(loss, argnums=(0, 1))(params, x)
    got = [layer(x)] + [g for _, g in tree_flatten(gradients)]
    for g, e in zip(got, expected, strict=True):
        assert _close(_np(g), _np(e))
    if training:
        assert memoryview(gradients[0]["weight"]).strides == (24 * 4, 4)


def test_weight_handles_pass_values_and_gradients_through_and_reading_restores_the_weights():
    layer = nn.Linear(6, 5)
    cotangent = mx.random.normal((5, 6), key=mx.random.key(26))

    def through_handles(weight):
        layer.update({"weight": weight})
        first, second = modules.weight_handles(layer, 2)
        return ((first["weight"] + 2 * second["weight"]) * cotangent).sum()

    original = layer.weight
    gradient = mx.grad(through_handles)(original)
    assert np.array_equal(_np(gradient), _np(3 * cotangent))
    layer.update({"weight": original})
    (handle,) = modules.weight_handles(layer, 1)
    assert np.array_equal(_np(handle["weight"]), _np(original))
    with pytest.raises(RuntimeError), modules.reading(layer, {"weight": mx.zeros((5, 6))}):
        assert not np.any(_np(layer.weight))
        raise RuntimeError
    assert layer.weight is original


def test_kernel_gradients_on_another_stream_equal_the_default_streams():
    """Each kernel's backward runs on the stream of its forward; the numbers must not change."""
    gate, up, q = (mx.random.normal((2, 3, 16, 8), key=mx.random.key(k)) for k in (23, 24, 25))

    def loss(gate, up, q):
        mixed = kernels.linear(kernels.silu_mul(gate, up), q[0, 0])
        return (kernels.attention(q, gate, up, 0.5, None)).sum() + mixed.sum()

    expected = mx.grad(loss, argnums=(0, 1, 2))(gate, up, q)
    with mx.stream(mx.new_stream(mx.cpu)):
        got = mx.grad(loss, argnums=(0, 1, 2))(gate, up, q)
        mx.eval(got)
    for g, e in zip(got, expected, strict=True):
        assert np.array_equal(_np(g), _np(e))


def test_compiled_forward_equals_eager(tiny_model, pixels):
    cpu.apply(tiny_model, streams=())
    eager = _np(tiny_model(pixels))
    compiled = _np(mx.compile(tiny_model)(pixels))
    assert np.max(np.abs(compiled - eager)) <= 1e-6


def test_non_float32_uses_native_ops(tiny_model, pixels):
    cpu.apply(tiny_model, streams=())
    reference = _np(
        cpu.remove(tiny_model).set_dtype(mx.bfloat16) or tiny_model(pixels.astype(mx.bfloat16))
    )
    out = cpu.apply(tiny_model, streams=())(pixels.astype(mx.bfloat16))
    assert out.dtype == mx.bfloat16 and np.array_equal(_np(out), reference)


def test_cpu_stream_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv(settings.STREAMS_ENV, "1")
    assert settings.stream_count() == 1
    monkeypatch.setenv(settings.STREAMS_ENV, "3")
    assert settings.stream_count() == 3


@pytest.mark.parametrize(
    "env, on_cpu, expected",
    [
        ({}, True, settings.BREADTH_FIRST),
        ({settings.SCHEDULE_ENV: "7"}, True, None),  # the user's value stands
        ({}, False, None),  # GPUs keep MLX's order
        # MLX reads these as 0 and hangs: replaced
        ({settings.SCHEDULE_ENV: "abc"}, True, settings.BREADTH_FIRST),
        ({settings.SCHEDULE_ENV: "0"}, True, settings.BREADTH_FIRST),
        ({settings.SCHEDULE_ENV: ""}, False, settings.MLX_DEFAULT_WIDTH),
        ({settings.SCHEDULE_ENV: "-3"}, False, settings.MLX_DEFAULT_WIDTH),
    ],
)
def test_mlx_schedules_breadth_first_on_a_cpu_unless_the_user_chose(env, on_cpu, expected):
    assert settings.scheduling_width(env, on_cpu) == expected


@pytest.mark.parametrize("user_value", [None, "7", "abc"])
def test_importing_aimv2_mlx_sets_the_scheduling_width_unless_the_user_did(user_value):
    env = {k: v for k, v in os.environ.items() if k != settings.SCHEDULE_ENV}
    if user_value is not None:
        env[settings.SCHEDULE_ENV] = user_value
    code = "import os, aimv2_mlx; print(os.environ.get('MLX_BFS_MAX_WIDTH'))"
    code += "\nimport mlx.core as mx; mx.eval(mx.ones(2) + 1)"  # hangs on a width of 0
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    usable = user_value if user_value and user_value.isdigit() else None
    chosen = settings.BREADTH_FIRST if cpu.on_cpu() else ("20" if user_value else "None")
    assert done.stdout.strip() == (usable or chosen)
    warned = "is not a positive integer" in done.stderr
    assert warned == (user_value is not None and usable is None)


def test_tune_and_restore_put_the_process_settings_back():
    from aimv2_mlx.cpu import blas

    threads, cache = blas.get_blas_threads(), mx.set_cache_limit(mx.get_memory_limit())
    mx.set_cache_limit(cache)
    with settings.tuned() as streams:
        if len(streams) > 1:
            assert blas.get_blas_threads() == 1
    assert blas.get_blas_threads() == threads
    assert mx.set_cache_limit(cache) == cache


def test_attention_pool_head_with_cpu_backend_matches_plain_forward_and_gradient():
    from aimv2_mlx.encoder import AttentionPoolHead

    head = AttentionPoolHead(32, 4, out_dims=5)
    head.cls_token = mx.random.normal(head.cls_token.shape, key=mx.random.key(20))
    tokens = mx.random.normal((6, 17, 32), key=mx.random.key(21)) * 3
    labels = mx.array([0, 1, 2, 3, 4, 0])

    def loss(params):
        head.update(params)
        return nn.losses.cross_entropy(head(tokens), labels, reduction="mean")

    params = head.trainable_parameters()
    expected_loss, expected = loss(params).item(), tree_flatten(mx.grad(loss)(params))
    cpu.apply(head, streams=(), training=True)
    assert isinstance(head, modules.CPUAttentionPoolHead)
    assert abs(loss(params).item() - expected_loss) <= 1e-5 * abs(expected_loss)
    got = dict(tree_flatten(mx.grad(loss)(params)))
    for name, value in expected:
        assert _close(_np(got[name]), _np(value)), name


def test_load_applies_the_cpu_backend_on_a_cpu_and_nothing_elsewhere(monkeypatch):
    from aimv2_mlx import model as model_module
    from aimv2_mlx.layers import Transformer

    trunk = aimv2_mlx.load("bundled").image_encoder.trunk  # the bundled model is a LiT
    assert isinstance(trunk, modules.CPUTransformer) == cpu.on_cpu()
    monkeypatch.setattr(model_module, "on_cpu", lambda: False)  # as on a GPU
    plain = aimv2_mlx.load("bundled")
    assert all(type(m) not in modules.PLAIN for _, m in plain.named_modules())
    assert type(plain.image_encoder.trunk) is Transformer


def test_paused_lifts_the_tuning_for_a_block_and_puts_it_back():
    from aimv2_mlx.cpu import blas

    threads = blas.get_blas_threads()
    streams = settings.tune()
    if len(streams) < 2:
        pytest.skip("one stream here: tuning leaves the BLAS threads alone")
    assert blas.get_blas_threads() == 1
    with settings.paused():
        assert blas.get_blas_threads() == threads
    assert blas.get_blas_threads() == 1
