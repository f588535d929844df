"""Fast float32 paths for MLX's CPU backend, and how the CPU encoder uses both cores.

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
for float32 on the CPU (`layers._fast_path`); tests/test_kernels.py checks every path.

Two cores
---------
MLX runs element-wise work on one thread per stream. On CPU the trunk therefore splits its
rows across `cpu_streams()` (one MLX CPU stream per core) and OpenBLAS is set to one thread,
so each stream's GEMMs and element-wise ops run on their own core, concurrently; see
`cpu_streams` for that process-wide choice.
"""

from __future__ import annotations

import ctypes
import os
import threading

import mlx.core as mx

from . import blas as backend

STREAMS_ENV = "AIMV2_MLX_CPU_STREAMS"

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
    return _exp_out(_exp_r(x, s), _two_n(s))


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


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the SwiGLU product, in four vectorised passes."""
    s = _silu_s(gate)
    return _silu_out(gate, up, _silu_r(gate, s), _two_n(s))


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
    return _exp_out(_shifted_r(scores, peak, scale, s), _two_n(s))


def softmax(scores: mx.array, scale: float = 1.0) -> mx.array:
    """softmax(scale * scores) over the last axis (max subtracted, so it never overflows)."""
    e = _exp_shifted(scores, mx.max(scores, axis=-1, keepdims=True), scale)
    return e / mx.sum(e, axis=-1, keepdims=True)


def _attend(q, k, v, scale, mask):
    """(B, H, n, d) queries against (B, H, N, d) keys/values -> unnormalised out, row sums."""
    scores = q @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores * scale + mask
        scale = 1.0
    e = _exp_shifted(scores, mx.max(scores, axis=-1, keepdims=True), scale)
    return e @ v, mx.sum(e, axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """Softmax attention, (B, H, N, d) in and out; `mask` is additive and broadcastable."""
    out, total = _attend(q, k, v, scale, mask)
    return out / total


def qkv_attention(
    qkv: mx.array, num_heads: int, scale: float, mask: mx.array | None, kv: mx.array | None = None
) -> mx.array:
    """Attention straight from fused projections: (B, n, 3D) in, (B, n, D) out.

    Queries come from `qkv`; keys and values from `kv` (B, N, 3D), which defaults to `qkv`
    (a row block of the sequence passes the whole sequence's projections there). One copy
    puts q, k, v head-major; the softmax normalisation is folded into the copy that puts the
    heads back, so no extra pass touches the (B, H, n, N) scores.
    """
    B, n, three_d = qkv.shape
    D, h = three_d // 3, num_heads
    if kv is None:
        q, k, v = mx.contiguous(qkv.reshape(B, n, 3, h, D // h).transpose(2, 0, 3, 1, 4))
    else:
        N = kv.shape[1]
        q = mx.contiguous(qkv[..., :D].reshape(B, n, h, D // h).transpose(0, 2, 1, 3))
        k, v = mx.contiguous(kv[..., D:].reshape(B, N, 2, h, D // h).transpose(2, 0, 3, 1, 4))
    out, total = _attend(q, k, v, scale, mask)
    return (out.transpose(0, 2, 1, 3) / total.transpose(0, 2, 1, 3)).reshape(B, n, D)


# --- using both cores ------------------------------------------------------------------------

_lock = threading.Lock()
_streams: list | None = None


def stream_count() -> int:
    """How many CPU streams the trunk splits over: `$AIMV2_MLX_CPU_STREAMS`, else one per core.

    Splitting needs the system OpenBLAS that `backend` loads (its thread count can be set);
    without it (reference BLAS, macOS Accelerate) this is 1 and nothing is changed.
    """
    env = os.environ.get(STREAMS_ENV, "").strip()
    if env:
        return max(1, int(env))
    if not backend._state.get("openblas"):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def set_blas_threads(n: int) -> bool:
    """Set the loaded OpenBLAS's thread count (process-wide). False when there is none."""
    path = backend._state.get("openblas")
    if not path:
        return False
    try:
        lib = ctypes.CDLL(path)
        lib.openblas_set_num_threads(ctypes.c_int(int(n)))
    except (OSError, AttributeError):
        return False
    return True


def cpu_streams() -> list:
    """The CPU streams the trunk splits its rows over ([] when splitting is off).

    The first call tunes the process for CPU inference; both settings are process-wide:

    * OpenBLAS is set to ONE thread (only when there is more than one stream). Each stream
      then runs its share of every GEMM on one core while the others do the same, and MLX's
      single-threaded element-wise ops (norms, SiLU, softmax) run on every core too. Measured
      on 2 cores (AIMv2-L, batch 8, fp32): 2 streams x 1 BLAS thread 7.0 s per batch; 1 stream
      x 2 BLAS threads 8.3 s; 2 streams x 2 BLAS threads 9.5 s (OpenBLAS serialises concurrent
      threaded calls and its spinning threads compete for the cores). The catch: a large
      matmul elsewhere in the process, outside the trunk, now gets one core. Call
      `set_blas_threads(n)` to change that, or set AIMV2_MLX_CPU_STREAMS=1 before the first
      forward to keep one stream and leave OpenBLAS alone.
    * MLX's buffer cache limit is raised to a quarter of its memory limit (never lowered).
      MLX's CPU default keeps only 32 MB of freed buffers, so the forward's large activations
      were returned to the OS and page-faulted back in on every use (~3% of the forward).
    """
    global _streams
    with _lock:
        if _streams is None:
            _streams = []
            if mx.default_device() == mx.cpu:
                _raise_cache_limit(mx.get_memory_limit() // 4)
                count = stream_count()
                if count > 1 and set_blas_threads(1):
                    _streams = [mx.new_stream(mx.cpu) for _ in range(count)]
        return _streams


def _raise_cache_limit(limit: int) -> None:
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)
