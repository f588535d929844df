"""Fast element-wise kernels for MLX's CPU backend.

MLX's CPU `exp`/`sigmoid` run ~70 M elements/s, which makes SiLU and the attention softmax cost
as much as the matmuls around them. Here exp is rebuilt from arithmetic ops (range reduction,
a degree-7 polynomial, 2^n through the float exponent bits) so that `mx.compile` fuses it into a
single vectorised loop: ~4x faster, max relative error ~1e-7. On GPUs the native ops are fast,
so callers use these only when `backend.on_cpu()`; parity tests cover both paths.
"""

from __future__ import annotations

import math

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
_EXP_MAX = 88.7
_EXP_MIN = -87.3
# exp(r) on |r| <= ln(2)/2: Taylor coefficients 1/k!, k = 0..7.
_COEFFS = tuple(1.0 / math.factorial(k) for k in range(8))


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 from multiply/add and bit operations only."""
    x = mx.clip(x, _EXP_MIN, _EXP_MAX)
    n = mx.round(x * _LOG2E)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    poly = mx.array(_COEFFS[-1], dtype=x.dtype)
    for c in reversed(_COEFFS[:-1]):
        poly = poly * r + c
    two_n = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)
    return poly * two_n.astype(x.dtype)


@mx.compile
def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the SwiGLU product, in one fused pass."""
    return gate * up / (1.0 + fast_exp(-gate))


@mx.compile
def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis with the fast exp (numerically stable: max subtracted)."""
    shifted = scores - mx.max(scores, axis=-1, keepdims=True)
    e = fast_exp(shifted)
    return e / mx.sum(e, axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """Plain softmax attention, (B, H, N, d) in and out; `mask` is additive, broadcastable."""
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask
    return softmax(scores) @ v
