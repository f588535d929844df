"""`aimv2 embed` as a process: killed mid-run and resumed, and split over two ranks by
mlx.launch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ENV = {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """48 real-photo crops (skimage) in two sub-folders, plus two broken files."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(48):
        image = sources[i % 4]
        top, left = rng.integers(0, 60, size=2)
        folder = root / ("a" if i % 3 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(image[top : top + 240, left : left + 280]).save(
            folder / f"{i:03d}.jpg", quality=85
        )
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (root / "b" / "empty.png").write_bytes(b"")
    return root


def _embed(*args: str) -> list[str]:
    return [sys.executable, "-m", "aimv2_mlx.cli", "embed", *args, "-m", "bundled"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sigkill_then_rerun_equals_uninterrupted_and_keeps_finished_shards(photos, tmp_path):
    args = ("--shard-size", "4", "--batch-size", "2")
    whole = subprocess.run(
        _embed(str(photos), "-o", str(tmp_path / "whole"), *args),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _embed(str(photos), "-o", str(out), *args),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (out / "shard-00000.done.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the run ended before its first shard"
        )
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {
        p.name: p.stat().st_mtime_ns
        for p in out.glob("shard-*")
        if (out / f"{p.name[:11]}.done.json").exists()
    }
    # killed mid-way (13 shards)
    assert 0 < len([n for n in finished if n.endswith(".done.json")]) < 13
    assert not (out / "manifest.json").read_text().count('"complete": true')

    rerun = subprocess.run(
        _embed(str(photos), "-o", str(out), *args, "--json"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert _files(out) == _files(tmp_path / "whole")
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished


def test_two_ranks_with_mlx_launch_equal_one_process(photos, tmp_path):
    launcher = Path(sys.executable).with_name("mlx.launch")
    args = ("--shard-size", "5", "--batch-size", "4")
    one = subprocess.run(
        _embed(str(photos), "-o", str(tmp_path / "one"), *args),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            str(launcher),
            "-n",
            "2",
            "--backend",
            "ring",
            "--",
            *_embed(str(photos), "-o", str(tmp_path / "two"), *args),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("embedded 48 of 50 images") == 1  # one summary, from rank 0
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
