"""The BLAS that MLX calls on a Linux CPU: which library, which of its kernels, and how fast.

The Linux `mlx[cpu]` wheel links a bundled reference BLAS (~4 GFLOP/s for fp32 GEMM). A system
OpenBLAS loaded with RTLD_GLOBAL *before* `mlx.core` is imported takes over MLX's `cblas_sgemm`
calls. A DYNAMIC_ARCH OpenBLAS picks its kernel when it is loaded, from the CPU it recognises;
an older one meeting a newer CPU falls back to a generic kernel (Debian's 0.3.21 runs
"Prescott", SSE3, on Sapphire Rapids: 5x slower than its own SkylakeX kernel there). So before
the dlopen we find the CPU's vector ISA and, in a cached subprocess, the kernel the library
would pick, and set OPENBLAS_CORETYPE where that kernel is generic and a matching one exists.
A coretype the user set is never touched.

No MLX import at the top: `aimv2_mlx` calls `load_openblas()` first thing, then imports MLX.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

DISABLE_ENV = "AIMV2_MLX_NO_OPENBLAS"
PATH_ENV = "AIMV2_MLX_OPENBLAS"
CORETYPE_ENV = "OPENBLAS_CORETYPE"
# Set beside OPENBLAS_CORETYPE when we chose it, so child processes can say where it came from.
CHOSEN_ENV = "AIMV2_MLX_CHOSEN_CORETYPE"
SLOW_GFLOPS = 20.0
SLOW_RATIO = 0.7
PROBE_TIMEOUT_S = 10.0
_CACHE_ENTRIES = 32

_OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

# What `openblas_get_corename()` returns (OpenBLAS driver/others/dynamic.c, dynamic_arm64.c),
# by the widest vector unit its kernels use. "generic" kernels are the ones a DYNAMIC_ARCH
# build falls back to for a CPU it does not know.
_KERNEL_CLASS = {
    **dict.fromkeys(
        (
            "katmai",
            "coppermine",
            "northwood",
            "prescott",
            "banias",
            "atom",
            "core2",
            "penryn",
            "dunnington",
            "nehalem",
            "athlon",
            "opteron",
            "opteron(sse3)",
            "barcelona",
            "nano",
            "bobcat",
        ),
        "sse",
    ),
    **dict.fromkeys(("sandybridge", "bulldozer", "piledriver", "steamroller"), "avx"),
    **dict.fromkeys(("haswell", "excavator", "zen"), "avx2"),
    **dict.fromkeys(("skylakex", "cooperlake", "sapphirerapids"), "avx512"),
    "armv8": "generic",
}
_GENERIC = {"sse", "avx", "generic"}


@dataclass(frozen=True)
class Isa:
    """A CPU's vector ISA as the OS reports it (/proc/cpuinfo)."""

    arch: str
    level: str  # x86: avx512 | avx2 | avx | sse; aarch64: sve2 | sve | neon; else unknown
    extras: tuple[str, ...] = ()  # avx512_bf16, amx, asimddp
    cpu_part: str | None = None  # aarch64 "CPU part" (MIDR part number)

    def __str__(self) -> str:
        extras = f" (+{', '.join(self.extras)})" if self.extras else ""
        part = f" part {self.cpu_part}" if self.cpu_part else ""
        return f"{self.arch} {self.level}{extras}{part}"


class Choice(NamedTuple):
    """The OPENBLAS_CORETYPE to set before the dlopen (None: leave it), and why."""

    coretype: str | None
    reason: str


def parse_isa(cpuinfo: str, machine: str) -> Isa:
    """The vector ISA from /proc/cpuinfo text (its first processor block) and `uname -m`."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    if machine in ("x86_64", "amd64", "AMD64"):
        flags = set(fields.get("flags", "").split())
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
            level = "avx512"
        elif {"avx2", "fma"} <= flags:
            level = "avx2"
        else:
            level = "avx" if "avx" in flags else "sse"
        extras = [name for name in ("avx512_bf16",) if name in flags and level == "avx512"]
        if flags & {"amx_tile", "amx_bf16", "amx_int8"}:
            extras.append("amx")
        return Isa("x86_64", level, tuple(extras))
    if machine in ("aarch64", "arm64"):
        features = set(fields.get("features", "").split())
        level = (
            "sve2"
            if "sve2" in features
            else "sve"
            if "sve" in features
            else "neon"
            if "asimd" in features
            else "unknown"
        )
        extras = tuple(name for name in ("asimddp",) if name in features)
        return Isa("aarch64", level, extras, fields.get("cpu part") or None)
    return Isa(machine or "unknown", "unknown")


def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read(256 * 1024)
    except OSError:
        return ""


def cpu_isa() -> Isa:
    """This machine's vector ISA."""
    return parse_isa(_cpuinfo_text(), platform.machine())


def best_coretype(isa: Isa) -> str | None:
    """The OpenBLAS coretype whose kernels match `isa` (None where we know no safe choice).

    x86: SkylakeX needs AVX-512 F/BW/DQ/VL/CD, Haswell AVX2 + FMA. Cooperlake (AVX512-BF16)
    and SapphireRapids reuse SkylakeX's fp32 GEMM and only add bf16 kernels MLX never calls;
    SkylakeX is known to every release since 0.2.20, and an unknown name makes OpenBLAS fall
    back to its own detection, i.e. to the generic kernel we meant to avoid.
    aarch64: the NEON kernels tuned for Neoverse N1 (OpenBLAS uses them for Apple cores and
    for SVE CPUs whose OS lacks SVE); CortexA57 for a core without the v8.2 dot product.
    No SVE kernel is forced: forcing skips OpenBLAS's own SVE check and older releases differ.
    """
    if isa.arch == "x86_64":
        return {"avx512": "SkylakeX", "avx2": "Haswell"}.get(isa.level)
    if isa.arch == "aarch64" and isa.level in ("neon", "sve", "sve2"):
        return "NEOVERSEN1" if "asimddp" in isa.extras else "CORTEXA57"
    return None


def choose_coretype(isa: Isa, library_kernel: str | None, env: Mapping[str, str]) -> Choice:
    """Whether to set OPENBLAS_CORETYPE before loading a library that would pick `library_kernel`.

    Only a generic or older-class kernel on a CPU with AVX-512 or AVX2 + FMA (aarch64: the
    generic ARMV8 kernel on a NEON CPU) is replaced; a good kernel of another family (Haswell
    or Zen on an AVX-512 CPU) is left alone. OPENBLAS_CORETYPE in `env`, even empty, wins.
    """
    if CORETYPE_ENV in env:
        value = env[CORETYPE_ENV]
        if env.get(CHOSEN_ENV) == value:
            return Choice(None, f"{CORETYPE_ENV}={value} chosen by aimv2-mlx in a parent process")
        return Choice(None, f"{CORETYPE_ENV}={value!r} set by the user")
    target = best_coretype(isa)
    if target is None:
        return Choice(None, f"the library's own choice (no better kernel known for {isa})")
    if not library_kernel:
        return Choice(None, "the library's own choice (its kernel could not be probed)")
    if _KERNEL_CLASS.get(library_kernel.lower()) in _GENERIC:
        return Choice(
            target,
            f"chosen by aimv2-mlx: the library would run its generic "
            f"{library_kernel} kernel on this {isa.level} CPU",
        )
    return Choice(None, f"the library's own choice ({library_kernel})")


# -- the probe: which kernel would the library pick here, without loading it in this process --

_PROBE = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
name = None
if hasattr(lib, "openblas_get_corename"):
    lib.openblas_get_corename.restype = ctypes.c_char_p
    name = lib.openblas_get_corename().decode("ascii", "replace")
print(json.dumps({"kernel": name}))
"""


def probe_cache_path() -> Path:
    """Where probed kernels are kept (the user cache dir)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aimv2-mlx" / "blas-kernels.json"


def _cpu_identity() -> str:
    keep = ("vendor_id", "cpu family", "model", "flags", "features", "cpu implementer", "cpu part")
    fields = []
    for line in _cpuinfo_text().splitlines():
        if not line.strip():
            break
        if line.partition(":")[0].strip().lower() in keep:
            fields.append(line.strip())
    return "\n".join(fields)


def _cache_key(path: str) -> str | None:
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    ident = json.dumps([real, stat.st_size, stat.st_mtime_ns, platform.machine(), _cpu_identity()])
    return hashlib.sha256(ident.encode()).hexdigest()


def _read_cache(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: Path, entries: dict) -> None:
    """Replace the cache file atomically; a cache that cannot be written only costs a probe."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dict(list(entries.items())[-_CACHE_ENTRIES:])))
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def probe_library_kernel(path: str) -> str | None:
    """The kernel the library at `path` picks on this CPU with no OPENBLAS_CORETYPE set.

    Found by loading it in a short subprocess (~20 ms), then cached keyed on the library's
    path, size and mtime and the CPU's identity. None when it cannot be found out (not an
    OpenBLAS, probe failed): the caller then changes nothing.
    """
    key = _cache_key(path)
    if key is None:
        return None
    cache = probe_cache_path()
    entries = _read_cache(cache)
    entry = entries.get(key)
    if isinstance(entry, dict) and "kernel" in entry:
        return entry["kernel"] if isinstance(entry["kernel"], str) else None
    env = {k: v for k, v in os.environ.items() if k not in (CORETYPE_ENV, "OPENBLAS_VERBOSE")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE, path],
            env=env,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
        kernel = json.loads(done.stdout)["kernel"] if done.returncode == 0 else None
    except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not (kernel is None or isinstance(kernel, str)):
        return None
    entries.pop(key, None)
    entries[key] = {"library": os.path.realpath(path), "kernel": kernel}
    _write_cache(cache, entries)
    return kernel


# -- loading --


def _fresh_state() -> dict:
    return {
        "openblas": None,
        "reason": "not attempted",
        "library_kernel": None,
        "chosen": None,
        "why": None,
        "lib": None,
    }


_state = _fresh_state()


def candidate_paths() -> list[str]:
    """System BLAS libraries to try, in order: $AIMV2_MLX_OPENBLAS, the usual OpenBLAS paths."""
    paths = [os.environ[PATH_ENV]] if os.environ.get(PATH_ENV) else []
    paths += [p for p in _OPENBLAS_PATHS if os.path.exists(p)]
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    return paths


def _preloaded_blas() -> str | None:
    """A BLAS already in this process's global symbol scope (LD_PRELOAD): its path, from
    /proc/self/maps.

    Only global symbols count: numpy's bundled OpenBLAS is loaded locally with prefixed names
    and serves no `cblas_sgemm` to MLX.
    """
    scope = ctypes.CDLL(None)
    if not any(hasattr(scope, name) for name in ("openblas_get_corename", "MKL_Get_Max_Threads")):
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        paths = set()
    found = sorted(p for p in paths if os.path.basename(p).startswith(("libopenblas", "libmkl_rt")))
    return found[0] if found else None


def _warn_mlx_first() -> None:
    sys.stderr.write(
        "aimv2-mlx: warning: mlx.core was imported before aimv2_mlx, so MLX keeps its "
        "bundled reference BLAS (fp32 GEMM ~4 GFLOP/s, tens of times slower); "
        "import aimv2_mlx first\n"
    )


def _decide(path: str) -> None:
    """Record (and apply, via os.environ) the coretype for loading `path`."""
    isa = cpu_isa()
    kernel = None
    if CORETYPE_ENV not in os.environ and best_coretype(isa):
        kernel = probe_library_kernel(path)
    choice = choose_coretype(isa, kernel, os.environ)
    _state.update(library_kernel=kernel, chosen=choice.coretype, why=choice.reason)
    if choice.coretype:
        os.environ[CORETYPE_ENV] = choice.coretype
        os.environ[CHOSEN_ENV] = choice.coretype


def _undo_choice() -> None:
    if _state["chosen"] and os.environ.get(CHOSEN_ENV) == _state["chosen"]:
        os.environ.pop(CORETYPE_ENV, None)
        os.environ.pop(CHOSEN_ENV, None)
    _state.update(library_kernel=None, chosen=None, why=None)


def load_openblas() -> str | None:
    """Load a system OpenBLAS globally (Linux only). Returns its path, or None with a reason
    kept.
    """
    if _state["openblas"] or _state["reason"] != "not attempted":
        return _state["openblas"]
    if sys.platform != "linux":
        _state["reason"] = f"not needed on {sys.platform}"
        return None
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _state["reason"] = f"disabled by {DISABLE_ENV}"
        return None
    preloaded = _preloaded_blas()
    if preloaded:
        _state.update(
            openblas=preloaded,
            reason="preloaded (LD_PRELOAD)",
            why="whatever was in the environment when it was preloaded",
        )
        return preloaded
    if "mlx.core" in sys.modules:
        _state["reason"] = "mlx.core was imported before aimv2_mlx; import aimv2_mlx first"
        _warn_mlx_first()
        return None
    for path in candidate_paths():
        _decide(path)
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            _undo_choice()
            continue
        _state.update(openblas=path, reason="loaded")
        return path
    _state["reason"] = (
        "no system OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)"
    )
    return None


# -- after loading: what runs, and its threads --


def library_path() -> str | None:
    """The BLAS library MLX's calls resolve to, or None (reference BLAS, macOS)."""
    return _state["openblas"]


def load_reason() -> str:
    """Why `library_path()` is what it is ("loaded", "disabled by …", …)."""
    return _state["reason"]


def kernel_choice() -> dict:
    """What the loader decided: the library's own kernel (probed), the coretype set, and why."""
    return {
        "library_kernel": _state["library_kernel"],
        "chosen": _state["chosen"],
        "why": _state["why"],
    }


def _library():
    if _state["lib"] is None and _state["openblas"]:
        try:
            _state["lib"] = ctypes.CDLL(_state["openblas"])
        except OSError:
            return None
    return _state["lib"]


def _text_call(lib, name: str) -> str | None:
    func = getattr(lib, name, None)
    if func is None:
        return None
    func.restype = ctypes.c_char_p
    value = func()
    return value.decode("ascii", "replace").strip() if value else None


def kernel_in_use() -> str | None:
    """OpenBLAS's kernel as loaded (`openblas_get_corename`); None for another BLAS or none."""
    lib = _library()
    return _text_call(lib, "openblas_get_corename") if lib is not None else None


def library_config() -> str | None:
    """The library's build line (`openblas_get_config`, MKL's version string), or None."""
    lib = _library()
    if lib is None:
        return None
    config = _text_call(lib, "openblas_get_config")
    if config is None and hasattr(lib, "MKL_Get_Version_String"):
        buffer = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buffer, ctypes.c_int(len(buffer)))
        config = buffer.value.decode("ascii", "replace").strip() or None
    return config


def get_blas_threads() -> int | None:
    """The loaded OpenBLAS's or MKL's thread count, or None when neither is loaded."""
    lib = _library()
    for name in ("openblas_get_num_threads", "MKL_Get_Max_Threads"):
        if lib is not None and hasattr(lib, name):
            return int(getattr(lib, name)())
    return None


def set_blas_threads(n: int) -> bool:
    """Set the loaded OpenBLAS's or MKL's thread count (process-wide). False when neither is
    loaded.
    """
    lib = _library()
    for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        if lib is not None and hasattr(lib, name):
            getattr(lib, name)(ctypes.c_int(int(n)))
            return True
    return False


# -- measuring --


def _best_seconds(run, repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_gemm_gflops(size: int = 1024, repeats: int = 3) -> float:
    """fp32 GEMM throughput of MLX's default device, in GFLOP/s (best of `repeats`)."""
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b)
    return 2 * size**3 / _best_seconds(lambda: mx.eval(a @ b), repeats) / 1e9


def measure_numpy_gemm_gflops(size: int = 1024, repeats: int = 3) -> float:
    """numpy's own fp32 GEMM (its bundled, well-detected OpenBLAS), in GFLOP/s."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = a.T.copy()
    return 2 * size**3 / _best_seconds(lambda: a @ b, repeats) / 1e9


def _settle() -> None:
    # OpenBLAS's worker threads spin for a while after a call; two pools in one process slow
    # each other ~2x when measured back to back, so let one pool go idle first.
    time.sleep(0.25)


def compare_gemm(size: int = 1024, rounds: int = 2) -> tuple[float, float]:
    """MLX's and numpy's fp32 GEMM GFLOP/s in this process, alternated, best of `rounds` each."""
    mlx_gflops = numpy_gflops = 0.0
    for i in range(rounds):
        if i:
            _settle()
        mlx_gflops = max(mlx_gflops, measure_gemm_gflops(size))
        _settle()
        numpy_gflops = max(numpy_gflops, measure_numpy_gemm_gflops(size))
    return mlx_gflops, numpy_gflops


def _blas_name(path: str) -> str:
    lib = _library()
    if lib is not None and hasattr(lib, "openblas_get_corename"):
        return f"OpenBLAS ({path})"
    if lib is not None and hasattr(lib, "MKL_Get_Max_Threads"):
        return f"MKL ({path})"
    return f"BLAS ({path})"


def _kernel_source() -> str:
    chosen, kernel = _state["chosen"], kernel_in_use()
    if chosen and kernel and chosen.lower() != kernel.lower():
        return f"{_state['why']}, but the library runs {kernel} instead of {chosen}"
    if _state["why"]:
        return _state["why"]
    if CORETYPE_ENV in os.environ:
        return f"{CORETYPE_ENV}={os.environ[CORETYPE_ENV]!r} set by the user"
    return "the library's own choice"


def _slow_fix(kernel: str | None) -> str:
    target = best_coretype(cpu_isa())
    other = f"point {PATH_ENV} at a faster BLAS (a newer OpenBLAS, or pip's mkl: libmkl_rt.so.2)"
    if kernel and target and target.lower() != kernel.lower():
        return f"start Python with {CORETYPE_ENV}={target} (this CPU's kernel), or {other}"
    return other


def describe() -> dict:
    """ISA, BLAS library and kernel, and MLX's fp32 GEMM beside numpy's — what `aimv2 info`
    prints.
    """
    import mlx.core as mx

    device = mx.default_device()
    info = {
        "mlx": mx.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "device": str(device),
        "isa": str(cpu_isa()),
    }
    kernel = None
    if device == mx.gpu:
        info["blas"] = "Metal (GPU)" if sys.platform == "darwin" else "CUDA (GPU)"
    elif sys.platform == "darwin":
        info["blas"] = "Accelerate"
    elif _state["openblas"]:
        info["blas"] = _blas_name(_state["openblas"])
        kernel = kernel_in_use()
        info["blas_kernel"] = kernel or "n/a"
        info["blas_kernel_source"] = _kernel_source()
        config = library_config()
        if config:
            info["blas_config"] = config
    else:
        info["blas"] = f"bundled reference BLAS ({_state['reason']})"
    info.setdefault("blas_kernel", "n/a")
    from . import settings  # here, not at the top: this module loads before MLX

    # MLX's task order as this process asked for it (MLX read it at its first evaluation)
    info["mlx_bfs_max_width"] = os.environ.get(
        settings.SCHEDULE_ENV, f"{settings.MLX_DEFAULT_WIDTH} (MLX's default)"
    )
    size = 512 if info["blas"].startswith("bundled") else 1024

    with settings.paused():  # a loaded model set the BLAS to one thread per stream
        mlx_gflops, numpy_gflops = compare_gemm(size)
    info["gemm_size"] = size
    info["mlx_gemm_gflops"] = round(mlx_gflops, 1)
    info["numpy_gemm_gflops"] = round(numpy_gflops, 1)
    info["mlx_vs_numpy"] = round(mlx_gflops / numpy_gflops, 2)
    if device != mx.cpu:
        return info
    if mlx_gflops < SLOW_GFLOPS:
        info["warning"] = (
            f"fp32 GEMM runs at {mlx_gflops:.1f} GFLOP/s: the slow reference BLAS is live; "
            "install libopenblas0-pthread and import aimv2_mlx before mlx"
        )
    elif mlx_gflops < SLOW_RATIO * numpy_gflops:
        info["warning"] = (
            f"MLX's fp32 GEMM runs at {mlx_gflops:.0f} GFLOP/s, {mlx_gflops / numpy_gflops:.2f}x "
            f"numpy's {numpy_gflops:.0f} (BLAS kernel {kernel or 'n/a'}, {_kernel_source()}): "
            + _slow_fix(kernel)
        )
    return info


def on_cpu() -> bool:
    """True when MLX computes on the CPU, where the hand-written fast kernels pay off."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu
