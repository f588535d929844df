"""The host facts every bench records: CPU, vector ISA, cores, the BLAS MLX calls and its kernel.

    python bench/host.py        # prints them as JSON (about a second)

KVM guests often report only "AMD EPYC" as the model name, so the CPU family/model numbers and
the vector ISA are what tell the hosts apart. The BLAS is the library that provides the
`cblas_sgemm` MLX resolves (the first one in the global symbol scope, else MLX's bundled one);
for an OpenBLAS its kernel is `openblas_get_corename()`, which a DYNAMIC_ARCH build picks at
load time from the CPU (or from OPENBLAS_CORETYPE) — a generic kernel such as Prescott on a CPU
with AVX-512 costs about 5x in fp32 GEMM. `collect()` must run in a process that imported
`aimv2_mlx` the way the benchmarked code does; benches call `collect_in_subprocess()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_NAMES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "AIMV2_MLX_OPENBLAS")
X86_ISA = (
    "sse2",
    "avx",
    "fma",
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)
ARM_ISA = ("asimd", "asimdhp", "sve", "sve2", "bf16", "sme")
VERSIONS = ("mlx", "torch", "transformers", "numpy")


def parse_cpuinfo(text: str) -> dict:
    """The first processor's fields of a /proc/cpuinfo text (x86 or aarch64 spelling)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def vector_isa(flags: set[str]) -> str:
    """The widest fp32 vector unit the flags name: amx, avx512, avx2+fma, avx, sse2, sve, asimd."""
    for name, needs in (
        ("amx", {"amx_tile"}),
        ("avx512", {"avx512f"}),
        ("avx2+fma", {"avx2", "fma"}),
        ("avx", {"avx"}),
        ("sse2", {"sse2"}),
        ("sve", {"sve"}),
        ("asimd", {"asimd"}),
    ):
        if needs <= flags:
            return name
    return "scalar"


def cpu_facts(cpuinfo: str) -> dict:
    fields = parse_cpuinfo(cpuinfo)
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    family = fields.get("cpu family") or fields.get("cpu architecture", "?")
    model = fields.get("model") or fields.get("cpu part", "?")
    return {
        "cpu": fields.get("model name") or platform.processor() or "unknown",
        "vendor": fields.get("vendor_id") or fields.get("cpu implementer", "unknown"),
        "cpu_family": family,
        "cpu_model": model,
        "cpu_family_model": f"{family}/{model}",
        "vector_isa": vector_isa(flags),
        "isa_flags": [f for f in X86_ISA + ARM_ISA if f in flags],
    }


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def blas_facts() -> dict:
    """Which library serves `cblas_sgemm` in this process, and its OpenBLAS kernel and threads."""
    try:
        sgemm = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p)
    except AttributeError:
        return {
            "blas": "MLX's bundled BLAS (no cblas_sgemm in the global scope)",
            "blas_kernel": None,
        }
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    path = (
        info.dli_fname.decode()
        if libc.dladdr(sgemm, ctypes.byref(info)) and info.dli_fname
        else "unknown"
    )
    facts = {"blas": path, "blas_kernel": None}
    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        lib.openblas_get_config.restype = ctypes.c_char_p
        facts.update(
            blas_kernel=lib.openblas_get_corename().decode(),
            blas_config=lib.openblas_get_config().decode(),
            blas_threads=lib.openblas_get_num_threads(),
        )
    except (OSError, AttributeError):
        pass  # not an OpenBLAS (MKL, BLIS, …): the path says what it is
    return facts


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            return round(int(handle.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _caches() -> dict:
    """cpu0's L2/L3 sizes from sysfs (OPENBLAS_L2_SIZE overrides what OpenBLAS assumes)."""
    found = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, size = (
                (index / "level").read_text().strip(),
                (index / "size").read_text().strip(),
            )
        except OSError:
            continue
        if level in ("2", "3"):
            found[f"l{level}_cache"] = size
    return found


def _versions() -> dict:
    found = {}
    for name in VERSIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def collect() -> dict:
    """Every host fact, read in this process (import `aimv2_mlx` first so its BLAS is loaded)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        **cpu_facts(cpuinfo),
        "cores": cores,
        **_caches(),
        "memory_gib": _memory_gib(),
        **blas_facts(),
        "env": {name: os.environ.get(name) for name in ENV_NAMES},
        "versions": _versions(),
    }


def collect_in_subprocess() -> dict:
    """`collect()` in a fresh process that imported aimv2_mlx and MLX, as the bench workers do."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def _busy_cpu_seconds() -> float:
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OthersCpu:
    """`with OthersCpu() as others:` — afterwards `others.cpus` is how many CPUs other processes
    kept busy on average meanwhile (this process and its children excluded; None off Linux), so a
    bench can flag runs a shared machine disturbed."""

    def __enter__(self) -> OthersCpu:
        self.cpus = None
        self._linux = sys.platform == "linux"
        self._busy = _busy_cpu_seconds() if self._linux else 0.0
        self._ours = self._own_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start
        if self._linux and wall > 0:
            others = _busy_cpu_seconds() - self._busy - (self._own_seconds() - self._ours)
            self.cpus = max(0.0, others / wall)

    @staticmethod
    def _own_seconds() -> float:
        return sum(
            u.ru_utime + u.ru_stime
            for u in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )


def emit(result: dict) -> None:
    """A worker's answer to its bench: one `RESULT {json}` line on stdout."""
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(cmd: list[str], what: str, env: dict | None = None) -> dict:
    """Run one bench worker process and return the last result it `emit`ted, with `others_cpu`
    (see `OthersCpu`) and `wall_s`. A worker that fails or answers nothing stops the bench with its
    output on stderr."""
    start = time.perf_counter()
    with OthersCpu() as others:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}
        )
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return {**json.loads(lines[-1][len("RESULT ") :]), "others_cpu": others.cpus, "wall_s": wall}


def summary(facts: dict) -> str:
    """One line for a report header."""
    return (
        f"{facts['cpu']} (family/model {facts['cpu_family_model']}, {facts['vector_isa']}, "
        f"{facts['cores']} cores); BLAS {facts['blas']} kernel {facts.get('blas_kernel')}; "
        + ", ".join(f"{k}={v}" for k, v in facts["env"].items() if v is not None)
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import aimv2_mlx  # noqa: F401  (loads the BLAS MLX will call, then MLX)

    import mlx.core  # noqa: F401

    print(json.dumps(collect(), indent=2))
