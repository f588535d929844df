"""The fast CPU float32 paths (kernels.py, the split trunk) against plain references.

Every fast path is compared with MLX's own ops (mx.exp, nn.silu, mx.softmax,
mx.fast.scaled_dot_product_attention) or with float64 NumPy, on tiny shapes.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import aimv2_mlx
from aimv2_mlx import layers
from aimv2_mlx.cpu import kernels
from aimv2_mlx.layers import prefix_mask

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
    gate = mx.array([-1e4, -150.0, -89.0, -88.0, -87.0, -20.0, -1.0, 0.0, 1.0, 20.0, 87.0, 88.0, 150.0, 1e4])
    up = mx.full(gate.shape, 1.5)
    expected = _np(nn.silu(gate) * up)
    got = _np(kernels.silu_mul(gate, up))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)


# --- softmax ---------------------------------------------------------------------------------


def test_softmax_matches_mx_softmax():
    scores = mx.random.normal((3, 4, 17, 33), key=mx.random.key(3)) * 8
    np.testing.assert_allclose(_np(kernels.softmax(scores)), _np(mx.softmax(scores, axis=-1)), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(
        _np(kernels.softmax(scores, scale=0.125)), _np(mx.softmax(scores * 0.125, axis=-1)), rtol=2e-6, atol=1e-7
    )


def test_softmax_with_masked_entries_and_large_logits():
    scores = mx.random.normal((5, 40), key=mx.random.key(4)) * 1000
    keep = mx.random.uniform(shape=(5, 40), key=mx.random.key(5)) < 0.7
    keep[:, 0] = True
    scores = mx.where(keep, scores, -math.inf)
    got, expected = _np(kernels.softmax(scores)), _np(mx.softmax(scores, axis=-1))
    assert np.all(got[~np.array(keep)] == 0.0)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)


# --- attention -------------------------------------------------------------------------------


def _qkv(B=2, H=3, N=19, d=8, seed=6):
    keys = mx.random.split(mx.random.key(seed), 3)
    return [mx.random.normal((B, H, N, d), key=k) for k in keys]


def _causal_bool(n):
    idx = mx.arange(n)
    return idx[None, :] <= idx[:, None]


@pytest.mark.parametrize("kind", ["none", "additive", "boolean", "causal", "prefix"])
def test_attention_matches_sdpa(kind):
    q, k, v = _qkv()
    B, H, N, d = q.shape
    scale = d**-0.5
    if kind == "none":
        mask = None
    elif kind == "additive":
        mask = mx.random.normal((B, 1, N, N), key=mx.random.key(7))
    elif kind == "boolean":
        mask = mx.random.uniform(shape=(B, 1, N, N), key=mx.random.key(8)) < 0.6
        mask = mask | mx.eye(N, dtype=mx.bool_)  # every query sees at least itself
    elif kind == "causal":
        mask = "causal"
    else:
        mask = prefix_mask(mx.array([3, 11]), N)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    got = kernels.attention(q, k, v, scale, layers._additive(mask, N, mx.float32))
    np.testing.assert_allclose(_np(got), _np(expected), rtol=1e-5, atol=2e-6)


def test_qkv_attention_on_row_blocks_equals_whole_sequence():
    B, N, D, H = 2, 21, 24, 3
    qkv = mx.random.normal((B, N, 3 * D), key=mx.random.key(9))
    mask = layers._additive(prefix_mask(mx.array([4, 9]), N), N, mx.float32)
    whole = kernels.qkv_attention(qkv, H, 0.3, mask)
    rows = [kernels.qkv_attention(qkv[:, a:b], H, 0.3, mask[..., a:b, :], kv=qkv) for a, b in ((0, 8), (8, N))]
    # Equal to float32 rounding: BLAS may block a GEMM differently for each shape (measured up
    # to 3e-7 on values near 2 with OpenBLAS on an AVX-512 machine).
    np.testing.assert_allclose(_np(mx.concatenate(rows, axis=1)), _np(whole), rtol=1e-5, atol=1e-6)
    q, k, v = qkv.reshape(B, N, 3, H, D // H).transpose(2, 0, 3, 1, 4)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    np.testing.assert_allclose(_np(whole), _np(expected.transpose(0, 2, 1, 3).reshape(B, N, D)), rtol=1e-5, atol=2e-6)


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
        new.append((name, mx.random.normal(value.shape, key=next(keys)) * scale + (1.0 if value.ndim == 1 else 0.0)))
    model.load_weights(new)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def pixels():
    return mx.random.normal((4, 56, 56, 3), key=mx.random.key(11))


@pytest.fixture
def no_split(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_streams", lambda: [])


def _forward(model, pixels, prefix=None):
    tokens, features = model.forward_features(pixels, feature_blocks=(0, -1), prefix_lengths=prefix)
    mx.eval(tokens, features)
    return [_np(tokens)] + [_np(f) for f in features]


@pytest.mark.parametrize("prefix", [None, [2, 7, 16, 1]])
def test_encoder_fast_path_matches_sdpa_path(tiny_model, pixels, prefix, monkeypatch, no_split):
    prefix = None if prefix is None else mx.array(prefix)
    fast = _forward(tiny_model, pixels, prefix)
    monkeypatch.setattr(layers, "_fast_path", lambda x: False)  # nn.silu + mx.fast SDPA
    reference = _forward(tiny_model, pixels, prefix)
    for got, expected in zip(fast, reference):  # raw block outputs reach |x| ~ 5: relative
        assert np.max(np.abs(got - expected)) <= 1e-5 * max(1.0, np.max(np.abs(expected)))


@pytest.mark.parametrize("batch", [4, 3, 1])  # 4: images per stream; 3 and 1: token blocks
@pytest.mark.parametrize("prefix", [False, True])
def test_split_over_streams_matches_single_stream(tiny_model, batch, prefix, monkeypatch):
    images = mx.random.normal((batch, 56, 56, 3), key=mx.random.key(12))
    lengths = mx.array([5, 1, 12, 3][:batch]) if prefix else None
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    monkeypatch.setattr(layers, "MIN_SPLIT_ROWS", 1)
    monkeypatch.setattr(kernels, "cpu_streams", lambda: [])
    whole = _forward(tiny_model, images, lengths)
    monkeypatch.setattr(kernels, "cpu_streams", lambda: streams)
    assert layers._split_plan(tiny_model.preprocessor(images)) is not None
    split = _forward(tiny_model, images, lengths)
    # Splitting changes GEMM row counts, and OpenBLAS may block (and so sum) differently for
    # each row count (not bit-identical on an AVX-512 Zen 5 machine even for whole images),
    # so allow float32 rounding, relative to the scale.
    for got, expected in zip(split, whole):
        assert np.max(np.abs(got - expected)) <= 1e-5 * max(1.0, np.max(np.abs(expected)))


def test_compiled_forward_equals_eager(tiny_model, pixels):
    eager = _np(tiny_model(pixels))
    compiled = _np(mx.compile(tiny_model)(pixels))
    assert np.max(np.abs(compiled - eager)) <= 1e-6


def test_non_float32_uses_native_ops(tiny_model, pixels):
    tiny_model.set_dtype(mx.bfloat16)
    out = tiny_model(pixels.astype(mx.bfloat16))
    assert out.dtype == mx.bfloat16 and np.all(np.isfinite(_np(out)))


def test_cpu_streams_configuration(monkeypatch):
    monkeypatch.setenv(kernels.STREAMS_ENV, "1")
    assert kernels.stream_count() == 1
    monkeypatch.setenv(kernels.STREAMS_ENV, "3")
    assert kernels.stream_count() == 3
