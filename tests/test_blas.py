"""The system OpenBLAS: loaded automatically on Linux, switchable off, results unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import aimv2_mlx
from aimv2_mlx.cpu import blas as backend

linux_with_openblas = pytest.mark.skipif(
    sys.platform != "linux" or not backend._candidates(),
    reason="needs Linux with a system OpenBLAS (apt-get install libopenblas0-pthread)",
)

_ENCODE = """
import sys, numpy as np
import aimv2_mlx, mlx.core as mx
from aimv2_mlx.cpu import blas as backend
model = aimv2_mlx.load("bundled")
size = model.model_config.vision.image_size
x = np.random.default_rng(0).standard_normal((8, size, size, 3)).astype(np.float32)
np.save(sys.argv[1], np.array(model(mx.array(x))))
print(backend._state["openblas"] or "none")
"""


def _run(code: str, *args, disable: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(backend.DISABLE_ENV, None)
    if disable:
        env[backend.DISABLE_ENV] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, check=True)


@linux_with_openblas
def test_openblas_changes_speed_not_results(tmp_path):
    fast = _run(_ENCODE, str(tmp_path / "fast.npy"), disable=False)
    slow = _run(_ENCODE, str(tmp_path / "slow.npy"), disable=True)
    assert "openblas" in fast.stdout.lower()
    assert slow.stdout.strip() == "none"
    a, b = np.load(tmp_path / "fast.npy"), np.load(tmp_path / "slow.npy")
    assert np.abs(a - b).max() <= 1e-5


@linux_with_openblas
def test_info_reports_blas_and_warns_when_slow():
    fast = subprocess.run([sys.executable, "-m", "aimv2_mlx.cli", "info", "--json"], capture_output=True,
                          text=True, env={**os.environ, backend.DISABLE_ENV: "0"})
    report = json.loads(fast.stdout)["backend"]
    assert report["blas"].startswith("OpenBLAS") and "warning" not in report
    slow = subprocess.run([sys.executable, "-m", "aimv2_mlx.cli", "info"], capture_output=True,
                          text=True, env={**os.environ, backend.DISABLE_ENV: "1"})
    assert slow.returncode == 0
    assert "bundled reference BLAS" in slow.stdout
    assert "warning" in slow.stderr and "slow reference BLAS" in slow.stderr


def test_late_import_is_reported_not_attempted(monkeypatch):
    monkeypatch.setattr(backend, "_state", {"openblas": None, "reason": "not attempted"})
    monkeypatch.setattr(sys, "platform", "linux")
    assert "mlx.core" in sys.modules
    assert backend.load_openblas() is None
    assert "imported before" in backend._state["reason"]


def test_disable_env(monkeypatch):
    monkeypatch.setattr(backend, "_state", {"openblas": None, "reason": "not attempted"})
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv(backend.DISABLE_ENV, "1")
    assert backend.load_openblas() is None
    assert backend.DISABLE_ENV in backend._state["reason"]


def test_gemm_measurement_is_positive():
    assert backend.measure_gemm_gflops(128, repeats=1) > 0
    assert aimv2_mlx.cpu.on_cpu() == (mx.default_device() == mx.cpu)
