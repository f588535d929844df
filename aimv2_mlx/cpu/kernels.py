"""Fast float32 kernels for MLX's CPU backend: exp, the SwiGLU product and attention, with
gradients.

Element-wise kernels
--------------------
MLX's CPU `exp`/`sigmoid` run ~70 M elements/s on x86 Linux (scalar code calling a software
`fmaf`), which makes SiLU and the attention softmax cost as much as the matmuls around them.
Here exp is rebuilt from arithmetic ops that `mx.compile` turns into vectorised C++ loops:

    exp(x) = 2^n * p(r),  n = round(x * log2 e),  r = x - n * ln 2 (two-part ln 2),

p a degree-5 polynomial fitted for relative error on |r| <= ln(2)/2 (<= 1.7e-7 in float32;
overall <= 2.5e-7 against the exact exp, more accurate than MLX's own CPU exp, which is off
by up to 4e-6 at large |x|). 2^n is made by shifting n + 127 into the exponent bits.

MLX's compiler fuses a graph only up to depth 11, only through nodes whose consumers are all
inside the fused region, and a bit-cast (`view`) always ends a kernel; gcc (plain -O3) only
vectorises a loop whose compares sit at its end. The kernels are therefore staged by hand so
that each stage is one vectorised loop (check with the C++ files MLX caches in
`$TMPDIR/mlx/<version>/cpu`):

    s  = clip(x * log2 e + 1.5 * 2^23)          # n sits in the low mantissa bits of s
    2^n = view_f32((view_u32(s) << 23) + bits(1.0))
    r  = (x - n * ln2_hi) - n * ln2_lo           # n = s - 1.5 * 2^23, spelled twice on purpose
    out = consumer(p(r) * 2^n)                   # p evaluated as even(r^2) + r * odd(r^2)

The same expression spelled two ways (`s - C` and `-C + s`, `r * r` and `square(r)`) is
deliberate: it keeps MLX's common-subexpression pass from sharing a node between two branches,
which would cut the kernel in two. On GPUs the native ops are fast, so callers use these only
for float32 on the CPU (`cpu.modules`); tests/test_kernels.py checks every path.

Every kernel that a model calls has a vector-Jacobian product built from the same
vectorised exp (`mx.custom_function`), so training gets the fast path in forward and backward.
MLX runs a custom VJP on whatever stream is the default when the gradient is traced, not on the
forward's stream as it does for its own primitives; each kernel therefore runs its backward on
the stream its forward ran on, or a trunk split over one stream per core would do all of its
attention and SwiGLU backward on one core.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # 11 significant bits: n * _LN2_HI is exact for |n| < 2^13
_LN2_LO = 1.428606765330187e-06
_ROUND = 12582912.0  # 1.5 * 2^23: (t + _ROUND) holds round(t) in its low mantissa bits
_N_MIN, _N_MAX = -127, 127  # 2^-127 is built as bits 0, i.e. +0.0: exp flushes to zero there
_S_MIN, _S_MAX = _ROUND + _N_MIN, _ROUND + _N_MAX
_ONE_BITS = 127 << 23  # bit pattern of 1.0f
# p(r) ~ exp(r) on |r| <= ln(2)/2, fitted for relative error (max 9.2e-8 in exact arithmetic).
_P = (
    1.0,
    0.9999997062972116,
    0.49999147818736606,
    0.166676381681471,
    0.041898162242156776,
    0.008290270255062822,
)


def _clip_s(t: mx.array) -> mx.array:
    """round(t) kept in a float as _ROUND + n, n clipped to [_N_MIN, _N_MAX]; NaN stays NaN."""
    s = t * _LOG2E + _ROUND  # compares only at the end of a loop, or gcc will not vectorise it
    s = mx.where(s < _S_MIN, _S_MIN, s)
    return mx.where(s > _S_MAX, _S_MAX, s)


def _reduced(x: mx.array, s: mx.array) -> mx.array:
    """r = x - n ln 2 for n = s - _ROUND, n spelled two ways so the kernel stays a tree.

    r is clamped below at -1: |r| <= ln(2)/2 unless n was clipped, and a clipped-low n means
    2^n = 0, so p(r) only has to stay finite there (it would be NaN for x = -inf).
    """
    r = (x - (s - _ROUND) * _LN2_HI) - ((-_ROUND) + s) * _LN2_LO
    return mx.where(r < -1.0, -1.0, r)


def _poly(r: mx.array) -> mx.array:
    """p(r) = even(r^2) + r * odd(r^2); r^2 computed twice, each Horner loop owning its copy."""
    r2a = r * r
    r2b = mx.square(r)
    even = ((_P[4] * r2a) + _P[2]) * r2a + _P[0]
    odd = ((_P[5] * r2b) + _P[3]) * r2b + _P[1]
    return odd * r + even


@mx.compile
def _pow2(s: mx.array) -> mx.array:
    """2^n from s = _ROUND + n: (bits(s) << 23) drops everything but n, then add bits(1.0)."""
    return mx.left_shift(s.view(mx.uint32), 23) + _ONE_BITS


def _staged(r: mx.array) -> mx.array:
    """End a stage inside an enclosing `mx.compile` (a training step): without this barrier the
    outer compiler fuses the r stage into its consumer, its clamp lands mid-loop, and the loop
    is no longer vectorised (measured 2x slower for the SwiGLU product). Free outside compile."""
    return mx.contiguous(r)


def _two_n(s: mx.array) -> mx.array:
    return _pow2(s).view(mx.float32)


# --- exp -------------------------------------------------------------------------------------


@mx.compile
def _exp_s(x):
    return _clip_s(x)


@mx.compile
def _exp_r(x, s):
    return _reduced(x, s)


@mx.compile
def _exp_out(r, t):
    return _poly(r) * t


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 from multiply/add/select and bit operations (rel. err. <= 2.5e-7).

    Exact at the edges that matter: exp(-inf) = 0, exp(+inf) = inf, exp(nan) = nan; results
    that would be subnormal (x < -87.7) flush to zero.
    """
    s = _exp_s(x)
    return _exp_out(_staged(_exp_r(x, s)), _two_n(s))


# --- SwiGLU ----------------------------------------------------------------------------------


@mx.compile
def _silu_s(gate):
    return _clip_s(-gate)


@mx.compile
def _silu_r(gate, s):
    return _reduced(-gate, s)


@mx.compile
def _silu_out(gate, up, r, t):
    # exp(-gate) = p(r) * t: 0 for gate > 87.7 (t = 0), inf for gate < -88.7 (-> 0 result).
    return gate * up / (1.0 + _poly(r) * t)


@mx.compile
def _silu_grads(gate, up, cotangent, r, t):
    """d/dgate and d/dup of silu(gate) * up, with sigma = sigmoid(gate) = 1 / (1 + exp(-gate)).

    d/dgate = up * sigma * (1 + gate * (1 - sigma)); written with 1 - sigma (not e * sigma) so
    that exp(-gate) = inf for very negative gates gives sigma = 0 rather than inf * 0.
    """
    sigma = 1.0 / (1.0 + _poly(r) * t)
    d_up = cotangent * gate * sigma
    d_gate = cotangent * up * sigma * (1.0 + gate * (1.0 - sigma))
    return d_gate, d_up


def _exp_of_minus(gate: mx.array) -> tuple[mx.array, mx.array]:
    """(r, 2^n) with exp(-gate) = p(r) * 2^n, for the stages above."""
    s = _silu_s(gate)
    return _staged(_silu_r(gate, s)), _two_n(s)


def _silu_mul_on(stream: mx.Stream) -> Callable:
    def forward(gate, up):
        return _silu_out(gate, up, *_exp_of_minus(gate))

    def backward(primals, cotangent, output):
        gate, up = primals
        with mx.stream(stream):
            return _silu_grads(gate, up, single(cotangent), *_exp_of_minus(gate))

    function = mx.custom_function(forward)
    function.vjp(backward)
    return function


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the SwiGLU product, in four vectorised passes (and five backward)."""
    return _on_this_stream(_silu_mul_on)(gate, up)


def single(arrays):
    """custom_function passes a lone output's cotangent as an array or a 1-tuple."""
    return arrays[0] if isinstance(arrays, (list, tuple)) else arrays


_kernels: dict[tuple, Callable] = {}


def _on_this_stream(make: Callable, *key) -> Callable:
    """`make(stream, *key)` for the current default stream, built once per stream and key.

    Streams compare equal by value but hash by identity, so the cache is keyed by their repr,
    which names the device and the stream's index.
    """
    stream = mx.default_stream(mx.default_device())
    cache_key = (make.__name__, repr(stream), *key)
    function = _kernels.get(cache_key)
    if function is None:
        function = _kernels[cache_key] = make(stream, *key)
    return function


# --- softmax and attention -------------------------------------------------------------------


@mx.compile
def _shifted_s(scores, peak, scale):
    return _clip_s((scores - peak) * scale)


@mx.compile
def _shifted_r(scores, peak, scale, s):
    return _reduced((scores - peak) * scale, s)


def _exp_shifted(scores: mx.array, peak: mx.array, scale: float) -> mx.array:
    """exp(scale * (scores - peak)) with the subtraction and scaling fused into the exp."""
    scale = mx.array(scale, dtype=scores.dtype)
    s = _shifted_s(scores, peak, scale)
    return _exp_out(_staged(_shifted_r(scores, peak, scale, s)), _two_n(s))


def _weights(q, k, scale, mask):
    """Unnormalised attention weights E = exp(S - max S), S = scale q k^T + mask, and their row
    sums.
    """
    scores = q @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores * scale + mask
        scale = 1.0
    e = _exp_shifted(scores, mx.max(scores, axis=-1, keepdims=True), scale)
    return e, mx.sum(e, axis=-1, keepdims=True)


@mx.compile
def _scores_grad(e, d_weights, delta, factor):
    """dL/dS' for S' = q k^T: softmax's backward, P (dP - delta), with P = e / total folded in."""
    return e * (d_weights - delta) * factor


def _attention_on(stream: mx.Stream, scale: float, masked: bool) -> Callable:
    """Differentiable softmax attention over (B, H, N, d) heads, for one scale and mask kind.

    Backward recomputes the weights (one GEMM and the vectorised exp) instead of keeping the
    (B, H, n, N) weights of every block alive for the whole step, as flash attention does.
    """

    def forward(q, k, v, mask=None):
        e, total = _weights(q, k, scale, mask)
        return (e @ v) / total

    def backward(primals, cotangent, output):
        with mx.stream(stream):
            return gradients(primals, cotangent)

    def gradients(primals, cotangent):
        q, k, v = primals[:3]
        mask = primals[3] if masked else None
        e, total = _weights(q, k, scale, mask)
        d_out = single(cotangent)
        d_weights = d_out @ v.swapaxes(-1, -2)
        # delta = sum(P dP) rather than the cheaper sum(dO O): exact when P is one-hot.
        delta = mx.sum(e * d_weights, axis=-1, keepdims=True) / total
        d_scores = _scores_grad(e, d_weights, delta, scale / total)
        grads = (d_scores @ k, d_scores.swapaxes(-1, -2) @ q, e.swapaxes(-1, -2) @ (d_out / total))
        return grads + (mx.zeros_like(mask),) if masked else grads

    if masked:
        function = mx.custom_function(lambda q, k, v, mask: forward(q, k, v, mask))
    else:
        function = mx.custom_function(lambda q, k, v: forward(q, k, v))
    function.vjp(backward)
    return function


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None
) -> mx.array:
    """Softmax attention, (B, H, n, d) queries against (B, H, N, d) keys and values; `mask` is
    additive and broadcastable to (B, H, n, N). Differentiable."""
    function = _on_this_stream(_attention_on, float(scale), mask is not None)
    return function(q, k, v) if mask is None else function(q, k, v, mask)


def qkv_attention(
    qkv: mx.array, num_heads: int, scale: float, mask: mx.array | None, kv: mx.array | None = None
) -> mx.array:
    """Attention straight from fused projections: (B, n, 3D) in, (B, n, D) out.

    Queries come from `qkv`; keys and values from `kv` (B, N, 3D), which defaults to `qkv`
    (a row block of the sequence passes the whole sequence's projections there). One copy
    puts q, k, v head-major, one puts the heads back.
    """
    B, n, three_d = qkv.shape
    D, h = three_d // 3, num_heads
    if kv is None:
        q, k, v = mx.contiguous(qkv.reshape(B, n, 3, h, D // h).transpose(2, 0, 3, 1, 4))
    else:
        N = kv.shape[1]
        q = mx.contiguous(qkv[..., :D].reshape(B, n, h, D // h).transpose(0, 2, 1, 3))
        k, v = mx.contiguous(kv[..., D:].reshape(B, N, 2, h, D // h).transpose(2, 0, 3, 1, 4))
    return attention(q, k, v, scale, mask).transpose(0, 2, 1, 3).reshape(B, n, D)


# --- linear layers ---------------------------------------------------------------------------


def _linear_on(stream: mx.Stream, has_bias: bool) -> Callable:
    def forward(x, weight, *bias):
        return mx.addmm(bias[0], x, weight.T) if has_bias else x @ weight.T

    def backward(primals, cotangent, output):
        x, weight = primals[0], primals[1]
        with mx.stream(stream):
            d_y = single(cotangent)
            rows = d_y.reshape(-1, d_y.shape[-1])
            # rows.T @ x is (out, in) in row order, as the weight and the optimizer state are
            d_weight = rows.T @ x.reshape(-1, x.shape[-1])
            if has_bias:
                return d_y @ weight, d_weight, mx.sum(rows, axis=0)
            return d_y @ weight, d_weight

    function = mx.custom_function(forward)
    function.vjp(backward)
    return function


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias), as `nn.Linear`, with a weight gradient laid out like the weight.

    MLX's own matmul gradient gives the weight's gradient as the transpose of an (in, out)
    product, a column-major view; AdamW's fused update then walks the weight, its moments and
    that gradient with a strided loop, ~35% slower than in row order at the base preset. Same
    products, same FLOPs; only the order of the weight-gradient product differs.
    """
    function = _on_this_stream(_linear_on, bias is not None)
    return function(x, weight) if bias is None else function(x, weight, bias)


# --- cross-entropy ---------------------------------------------------------------------------


@mx.compile
def _softmax_minus_target(e, total, hit, cotangent):
    """dL/dlogits of the per-position cross-entropy: cotangent * (softmax - one_hot)."""
    return cotangent * (e / total - hit)


def _cross_entropy_on(stream: mx.Stream) -> Callable:
    def exp_and_total(logits):
        peak = mx.max(logits, axis=-1, keepdims=True)
        e = _exp_shifted(logits, peak, 1.0)
        return peak, e, mx.sum(e, axis=-1, keepdims=True)

    def forward(logits, targets):
        peak, _, total = exp_and_total(logits)
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)
        # (peak - picked) first: exactly 0 when the target wins, so a near-zero loss keeps digits
        return ((peak - picked) + mx.log(total))[..., 0]

    def backward(primals, cotangent, output):
        logits, targets = primals
        with mx.stream(stream):
            _, e, total = exp_and_total(logits)
            hit = (mx.arange(logits.shape[-1]) == targets[..., None]).astype(logits.dtype)
            d_logits = _softmax_minus_target(e, total, hit, single(cotangent)[..., None])
            return d_logits, mx.zeros_like(targets)

    function = mx.custom_function(forward)
    function.vjp(backward)
    return function


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy of float32 `logits` (..., V) against integer `targets` (...),
    as `nn.losses.cross_entropy(..., reduction="none")`, with the vectorised exp in forward and
    backward (MLX's log-sum-exp calls its scalar exp)."""
    return _on_this_stream(_cross_entropy_on)(logits, targets)
