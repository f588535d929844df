"""Numerical backend: make MLX fast on Linux CPUs and say which BLAS is really in use.

The Linux `mlx[cpu]` wheel links a bundled reference BLAS (~4 GFLOP/s for fp32 GEMM). A system
OpenBLAS loaded with RTLD_GLOBAL *before* `mlx.core` is imported takes over MLX's `cblas_sgemm`
calls (~170 GFLOP/s on two cores). This module must not import MLX at the top: `aimv2_mlx`
calls `load_openblas()` first thing, then imports MLX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import time

DISABLE_ENV = "AIMV2_MLX_NO_OPENBLAS"
PATH_ENV = "AIMV2_MLX_OPENBLAS"
SLOW_GFLOPS = 20.0

_OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

_state = {"openblas": None, "reason": "not attempted"}


def _candidates() -> list[str]:
    paths = [os.environ[PATH_ENV]] if os.environ.get(PATH_ENV) else []
    paths += [p for p in _OPENBLAS_PATHS if os.path.exists(p)]
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    return paths


def load_openblas() -> str | None:
    """Load a system OpenBLAS globally (Linux only). Returns its path, or None with a reason kept."""
    if _state["openblas"] or _state["reason"] != "not attempted":
        return _state["openblas"]
    if sys.platform != "linux":
        _state["reason"] = f"not needed on {sys.platform}"
        return None
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _state["reason"] = f"disabled by {DISABLE_ENV}"
        return None
    if "mlx.core" in sys.modules:
        _state["reason"] = "mlx.core was imported before aimv2_mlx; import aimv2_mlx first"
        return None
    for path in _candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _state.update(openblas=path, reason="loaded")
        return path
    _state["reason"] = "no system OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)"
    return None


def measure_gemm_gflops(size: int = 1024, repeats: int = 3) -> float:
    """fp32 GEMM throughput of MLX's default device, in GFLOP/s (best of `repeats`)."""
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def describe() -> dict:
    """Device, BLAS and measured GEMM speed — what `aimv2 info` prints."""
    import mlx.core as mx

    device = mx.default_device()
    info = {
        "mlx": mx.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "device": str(device),
    }
    if device == mx.gpu:
        info["blas"] = "Metal (GPU)" if sys.platform == "darwin" else "CUDA (GPU)"
    elif sys.platform == "darwin":
        info["blas"] = "Accelerate"
    elif _state["openblas"]:
        info["blas"] = f"OpenBLAS ({_state['openblas']})"
    else:
        info["blas"] = f"bundled reference BLAS ({_state['reason']})"
    gflops = measure_gemm_gflops(512 if info["blas"].startswith("bundled") else 1024)
    info["gemm_gflops"] = round(gflops, 1)
    if device == mx.cpu and gflops < SLOW_GFLOPS:
        info["warning"] = (
            f"fp32 GEMM runs at {gflops:.1f} GFLOP/s: the slow reference BLAS is live; "
            "install libopenblas0-pthread and import aimv2_mlx before mlx"
        )
    return info


def on_cpu() -> bool:
    """True when MLX computes on the CPU, where the hand-written fast kernels pay off."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def _library():
    path = _state.get("openblas")
    if not path:
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def get_blas_threads() -> int | None:
    """The loaded OpenBLAS's thread count, or None when there is none to ask."""
    lib = _library()
    try:
        return int(lib.openblas_get_num_threads()) if lib is not None else None
    except AttributeError:
        return None


def set_blas_threads(n: int) -> bool:
    """Set the loaded OpenBLAS's thread count (process-wide). False when there is none."""
    lib = _library()
    try:
        lib.openblas_set_num_threads(ctypes.c_int(int(n)))
    except AttributeError:
        return False
    return True
