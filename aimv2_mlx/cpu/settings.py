"""The process-wide settings the CPU backend makes: all of them here, all restorable.

`tune()` is called by `cpu.apply` (so by `load()` and the training loop on a CPU):

* OpenBLAS (or MKL) is set to ONE thread when the trunk splits its rows over more than one
  stream. Each stream then runs its share of every GEMM on one core while the others do the
  same, and MLX's single-threaded element-wise ops run on every core too. Measured on 2 cores
  (AIMv2-L, batch 8, fp32): 2 streams x 1 BLAS thread 7.0 s per batch; 1 stream x 2 BLAS
  threads 8.3 s; 2 streams x 2 threads 9.5 s (concurrent threaded calls serialise and their
  spinning threads compete for the cores). The catch: a large matmul elsewhere in the process,
  outside the trunk, gets one core. `AIMV2_MLX_CPU_STREAMS=1` keeps one stream and leaves the
  BLAS alone.
* MLX's buffer cache limit is raised to a quarter of its memory limit (never lowered). MLX's
  CPU default keeps only 32 MB of freed buffers, so a forward's large activations were
  returned to the OS and page-faulted back in on every use (~3% of an AIMv2-L forward).

`restore()` puts both back as they were before the first `tune()`; `tuned()` scopes them and
`paused()` lifts them for a block.

One more is made at import, because MLX reads it once, at its first evaluation, and it cannot be
undone: `schedule_breadth_first()` sets `MLX_BFS_MAX_WIDTH` (unless the user set it to a
positive integer) when MLX computes on the CPU. MLX orders a graph's tasks breadth-first up to
that width (default 20) and depth-first beyond it, and keeps at most 10 tasks in flight
(mlx/transforms.cpp, `eval_impl`). With the trunk's rows split over one stream per core, a
depth-first stretch queues one stream's tasks while the other stream, having none, sits idle;
breadth-first order alternates them.
Only the order of independent operations changes, never a result. Measured (training steps,
2-core Zen 5, `OPENBLAS_CORETYPE=Haswell`): tiny 0.37 -> 0.33 s, small 2.68 -> 2.43 s, base
9.2 -> 8.4 s, same peak memory; AIMv2-L inference unchanged.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

import mlx.core as mx

from . import blas

STREAMS_ENV = "AIMV2_MLX_CPU_STREAMS"
MAX_STREAMS = 8

SCHEDULE_ENV = "MLX_BFS_MAX_WIDTH"
BREADTH_FIRST = str(1 << 20)  # wider than any graph here: breadth-first throughout
MLX_DEFAULT_WIDTH = "20"

_lock = threading.Lock()
_saved: dict | None = None  # what tune() changed, to restore; None while untuned
_streams: list = []


def stream_count() -> int:
    """How many CPU streams a trunk splits over: `$AIMV2_MLX_CPU_STREAMS`, else one per core.

    Splitting needs a BLAS whose thread count can be set (the system OpenBLAS or MKL that
    `blas` loads); without one (reference BLAS, macOS Accelerate) this is 1.
    """
    env = os.environ.get(STREAMS_ENV, "").strip()
    if env:
        return max(1, int(env))
    if blas.get_blas_threads() is None:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_STREAMS))


def tune(split: bool = True) -> list:
    """Make the settings above and return the CPU streams trunks split over ([]: none).

    `split=False` only raises the cache limit (one stream, the BLAS keeps its threads).
    Repeated calls change nothing more; `restore()` undoes them all.
    """
    global _saved, _streams
    with _lock:
        if _saved is None:
            limit = mx.get_memory_limit() // 4
            _saved = {"cache_limit": mx.set_cache_limit(limit)}
            if _saved["cache_limit"] > limit:
                mx.set_cache_limit(_saved["cache_limit"])
        if split and "blas_threads" not in _saved:
            count, threads = stream_count(), blas.get_blas_threads()
            if count > 1 and threads is not None and blas.set_blas_threads(1):
                _saved["blas_threads"] = threads
                if len(_streams) != count:
                    _streams = [mx.new_stream(mx.cpu) for _ in range(count)]
        return _streams if split and "blas_threads" in _saved else []


def scheduling_width(env: dict, on_cpu: bool) -> str | None:
    """The `MLX_BFS_MAX_WIDTH` to set, or None: a user's value stands and GPUs keep MLX's, except
    that a value that is not a positive integer is replaced (MLX reads it as 0 and then hangs in
    its first evaluation)."""
    user = env.get(SCHEDULE_ENV)
    if user is not None:
        if user.strip().isdigit() and int(user) > 0:
            return None
        return BREADTH_FIRST if on_cpu else MLX_DEFAULT_WIDTH
    return BREADTH_FIRST if on_cpu else None


def schedule_breadth_first() -> None:
    """Set MLX's scheduling width for the CPU (see the module's docstring); before any eval."""
    user = os.environ.get(SCHEDULE_ENV)
    width = scheduling_width(os.environ, mx.default_device() == mx.cpu)
    if width is None:
        return
    if user is not None:
        sys.stderr.write(
            f"aimv2-mlx: warning: {SCHEDULE_ENV}={user!r} is not a positive integer (MLX would "
            f"hang on it); using {width}\n"
        )
    os.environ[SCHEDULE_ENV] = width


def restore() -> None:
    """Undo `tune()`: the BLAS thread count and the cache limit it found."""
    global _saved
    with _lock:
        if _saved is None:
            return
        mx.set_cache_limit(_saved["cache_limit"])
        if "blas_threads" in _saved:
            blas.set_blas_threads(_saved["blas_threads"])
        _saved = None


@contextmanager
def tuned():
    """`tune()` for the duration of a block, restored after it unless it was already tuned."""
    was_tuned = _saved is not None
    try:
        yield tune()
    finally:
        if not was_tuned:
            restore()


@contextmanager
def paused():
    """The process as it was before `tune()` for the duration of a block, tuned again after it:
    for measuring the BLAS at its own thread count (`aimv2 info` after a model was loaded)."""
    split = _saved is not None and "blas_threads" in _saved
    was_tuned = _saved is not None
    restore()
    try:
        yield
    finally:
        if was_tuned:
            tune(split)
