"""Data parallel: `mlx.launch -n 2 --backend ring` on loopback with per-rank batch B matches one
process with batch 2B (same data order): losses and weights after 5 steps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.tokenizer import train_tokenizer

import mlx.core as mx
import numpy as np
import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")


def _weights(run: Path) -> dict:
    folder = sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
    encoder = mx.load(str(folder / "encoder" / "model.safetensors"))
    decoder = mx.load(str(folder / "decoder.safetensors"))
    return {
        **{f"encoder.{k}": v for k, v in encoder.items()},
        **{f"decoder.{k}": v for k, v in decoder.items()},
    }


def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.exists() and shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not installed")
    data = write_shapes(tmp_path / "data", 24, size=28)
    train_tokenizer(load_captioned(data).captions(), 64, 10).save(data / "tokenizer.json")
    launch = [
        str(launcher if launcher.exists() else shutil.which("mlx.launch")),
        "-n",
        "2",
        "--backend",
        "ring",
        "--python",
        sys.executable,
        str(WORKER),
    ]
    two = subprocess.run(
        launch + [str(data), str(tmp_path / "two"), "3", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run(
        [sys.executable, str(WORKER), str(data), str(tmp_path / "one"), "6", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    logs = [
        [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("two", "one")
    ]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5]
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "loss_pixel", "loss_text", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    w_two, w_one = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert w_two.keys() == w_one.keys()
    for key in w_one:
        np.testing.assert_allclose(
            np.array(w_two[key]), np.array(w_one[key]), rtol=1e-4, atol=1e-6, err_msg=key
        )
