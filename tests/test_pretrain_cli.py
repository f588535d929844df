"""`aimv2 data shapes`, `tokenizer train`, `pretrain` (incl. --resume), `export`, then `embed` on
the export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import aimv2_mlx


def _aimv2(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", *args], capture_output=True, text=True, env=env
    )


def _ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


TINY = [
    "--width",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--image-size",
    "28",
    "--decoder-depth",
    "1",
    "-b",
    "4",
    "--no-compile",
    "--context-length",
    "12",
]


def test_shapes_to_pretrain_to_export_to_embed(tmp_path):
    data, run, enc = tmp_path / "shapes", tmp_path / "run", tmp_path / "encoder"
    _ok(_aimv2("data", "shapes", str(data), "--n", "16", "--size", "28"))
    assert len(list((data / "images").glob("*.png"))) == 16
    assert "tokens" in _ok(
        _aimv2(
            "tokenizer", "train", str(data), "-o", str(tmp_path / "tok.json"), "--vocab-size", "80"
        )
    )
    _ok(
        _aimv2(
            "pretrain",
            str(data),
            "-o",
            str(run),
            *TINY,
            "--steps",
            "4",
            "--log-every",
            "1",
            "--tokenizer",
            str(tmp_path / "tok.json"),
        )
    )
    assert "--resume" in _aimv2("pretrain", str(data), "-o", str(run), *TINY).stderr
    # nothing left to do
    assert "step 4" in _ok(_aimv2("pretrain", str(data), "-o", str(run), "--resume"))
    assert len((run / "log.jsonl").read_text().splitlines()) == 4
    _ok(_aimv2("export", str(run), str(enc)))
    info = json.loads(_ok(_aimv2("info", str(enc), "--json")))
    assert info["config"]["source"]["step"] == 4 and info["kind"] == "vision encoder"
    _ok(_aimv2("embed", str(data / "images"), "-o", str(tmp_path / "vectors"), "-m", str(enc)))
    vectors, _ = aimv2_mlx.read_embeddings(tmp_path / "vectors")
    assert vectors.shape == (16, 32)


def test_pretrain_bad_input_is_one_line(tmp_path):
    result = _aimv2("pretrain", str(tmp_path / "missing"), "-o", str(tmp_path / "run"))
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "missing: no such folder" in result.stderr
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(b"not a png")
    (tmp_path / "d" / "a.txt").write_text("caption")
    result = _aimv2(
        "pretrain", str(tmp_path / "d"), "-o", str(tmp_path / "run"), *TINY, "--steps", "1"
    )
    assert (
        result.returncode == 1
        and "a.png" in result.stderr
        and result.stderr.strip().count("\n") == 0
    )
    result = _aimv2(
        "pretrain", str(tmp_path / "d"), "-o", str(tmp_path / "run2"), "--objective", "nope"
    )
    assert result.returncode == 1 and "unknown objective" in result.stderr
