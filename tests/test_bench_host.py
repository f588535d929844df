"""bench/host.py: the host facts every bench records (CPU, ISA, the BLAS MLX calls, its kernel)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
_spec = importlib.util.spec_from_file_location("bench_host", BENCH / "host.py")
host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host)  # by path: sys.path stays as it was

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: SomethingElse
"""
SAPPHIRE = (
    ZEN5.replace("AuthenticAMD", "GenuineIntel")
    .replace(": 26", ": 6")
    .replace(": 2\n", ": 143\n")
    .replace("avx512_bf16", "avx512_bf16 amx_tile amx_bf16")
)
HASWELL = ZEN5.replace(" avx512f avx512_bf16", "")
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve sve2 bf16
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd4f
"""


def test_the_first_processor_gives_the_family_model_and_widest_vector_unit():
    facts = host.cpu_facts(ZEN5)
    assert (facts["vendor"], facts["cpu_family_model"], facts["vector_isa"]) == (
        "AuthenticAMD",
        "26/2",
        "avx512",
    )
    assert facts["isa_flags"] == ["sse2", "avx", "fma", "avx2", "avx512f", "avx512_bf16"]


def test_amx_avx2_and_arm_hosts_are_told_apart():
    assert host.cpu_facts(SAPPHIRE)["vector_isa"] == "amx"
    assert host.cpu_facts(SAPPHIRE)["cpu_family_model"] == "6/143"
    assert host.cpu_facts(HASWELL)["vector_isa"] == "avx2+fma"
    arm = host.cpu_facts(GRAVITON)
    assert (arm["vector_isa"], arm["cpu_family_model"], arm["vendor"]) == ("sve", "8/0xd4f", "0x41")
    assert arm["isa_flags"] == ["asimd", "sve", "sve2", "bf16"]


def test_avx2_without_fma_is_not_reported_as_avx2_fma():
    assert host.vector_isa({"sse2", "avx", "avx2"}) == "avx"


def test_the_kernel_reported_is_the_one_the_loaded_openblas_runs():
    if not os.path.exists("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"):
        pytest.skip("needs Debian's x86-64 system OpenBLAS (DYNAMIC_ARCH)")
    # only in the child: the parent's stays as set
    env = {**os.environ, "OPENBLAS_CORETYPE": "Prescott"}
    out = subprocess.run(
        [sys.executable, str(BENCH / "host.py")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    facts = json.loads(out.stdout)
    assert facts["blas"].endswith("libopenblas.so.0")
    assert facts["blas_kernel"] == "Prescott"
    assert facts["env"]["OPENBLAS_CORETYPE"] == "Prescott"


def test_without_the_system_openblas_the_bundled_blas_is_named():
    env = {**os.environ, "AIMV2_MLX_NO_OPENBLAS": "1"}
    out = subprocess.run(
        [sys.executable, str(BENCH / "host.py")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    facts = json.loads(out.stdout)
    assert "bundled" in facts["blas"] and facts["blas_kernel"] is None
