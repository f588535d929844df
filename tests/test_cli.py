"""The `aimv2` command: the quickstart job and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aimv2_mlx

import numpy as np

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"


def _aimv2(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", *args], capture_output=True, text=True, env=env
    )


def test_embed_sample_folder_offline_uses_bundled_model(tmp_path):
    out = tmp_path / "vectors"
    result = _aimv2("embed", str(PHOTOS), "-o", str(out), cache=tmp_path / "empty-cache")
    assert result.returncode == 0, result.stderr
    assert "apple/aimv2-large-patch14-224" in result.stderr and "bundled" in result.stderr
    lines = result.stdout.strip().splitlines()
    assert str(out) in lines[-1] and "embedded 4 of 4" in lines[-1]
    vectors, metadata = aimv2_mlx.read_embeddings(out)
    paths = metadata.column("path").to_pylist()
    width = aimv2_mlx.load("bundled").config.vision.hidden_size
    assert vectors.shape == (len(paths), width) and paths == sorted(
        p.name for p in PHOTOS.glob("*.jpg")
    )
    manifest = json.loads((out / "manifest.json").read_text())
    bundled = aimv2_mlx.load("bundled").config.preprocess.mode
    assert manifest["preprocess"]["mode"] == bundled and manifest["counts"]["embedded"] == len(
        paths
    )
    assert (out / "failures.jsonl").read_text() == ""
    model = aimv2_mlx.load("bundled")
    single = aimv2_mlx.embed([PHOTOS / paths[0]], model, batch_size=1)
    assert np.abs(single[0] - vectors[0]).max() <= 1e-5


def test_embed_json_summary_is_the_only_stdout(tmp_path):
    result = _aimv2(
        "embed", str(PHOTOS), "-o", str(tmp_path / "o"), "--json", cache=tmp_path / "empty-cache"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["embedded"] == 4 and summary["failed"] == 0 and summary["images_per_s"] > 0
    assert "bundled" in result.stderr  # the offline fallback notice moves to stderr


def test_embed_strict_fails_on_a_bad_file_and_nothing_usable_fails_always(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((PHOTOS / "chelsea.jpg").read_bytes())
    (folder / "bad.jpg").write_text("not a jpeg")
    lenient = _aimv2(
        "embed", str(folder), "-o", str(tmp_path / "a"), "-m", "bundled", cache=tmp_path
    )
    assert lenient.returncode == 0 and "1 failed" in lenient.stdout
    assert "skipped bad.jpg: not a readable image" in lenient.stderr
    strict = _aimv2(
        "embed", str(folder), "-o", str(tmp_path / "b"), "-m", "bundled", "--strict", cache=tmp_path
    )
    assert strict.returncode == 1
    failures = [
        json.loads(line) for line in (tmp_path / "b" / "failures.jsonl").read_text().splitlines()
    ]
    assert [f["path"] for f in failures] == ["bad.jpg"] and "bad.jpg" in failures[0]["path"]
    (folder / "good.jpg").unlink()
    nothing = _aimv2(
        "embed", str(folder), "-o", str(tmp_path / "c"), "-m", "bundled", cache=tmp_path
    )
    assert nothing.returncode == 1


def test_missing_folder_is_one_line_error(tmp_path):
    result = _aimv2(
        "embed", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "-m", "bundled", cache=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "nope" in result.stderr


def test_info_on_unreachable_model_names_it(tmp_path):
    result = _aimv2("info", "apple/aimv2-huge-patch14-448", cache=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: apple/aimv2-huge-patch14-448")
    assert result.stderr.strip().count("\n") == 0


def test_info_labels_bundled_model(tmp_path):
    result = _aimv2("info", "bundled", cache=tmp_path)
    assert result.returncode == 0
    model = aimv2_mlx.load("bundled")
    probe = model.config.source["probe_scores"]
    shown = " ".join(result.stdout.split())  # long values are wrapped
    assert "pre-trained by aimv2-mlx" in shown and "not a general-purpose encoder" in shown
    assert f"{aimv2_mlx.parameter_count(model):,}" in shown
    assert (
        f"mean {probe['pretrained']['mean']:.1f}" in shown and "steps on aimv2 data shapes" in shown
    )
    assert probe["pretrained"]["mean"] > probe["random_init"]["mean"]


def test_convert_round_trip(tmp_path, transformers_reference):
    import torch
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(0)
    Aimv2VisionModel(
        Aimv2VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            use_head=False,
        )
    ).save_pretrained(tmp_path / "hf")
    result = _aimv2("convert", str(tmp_path / "hf"), str(tmp_path / "mlx"), cache=tmp_path)
    assert result.returncode == 0, result.stderr
    a, b = aimv2_mlx.load(tmp_path / "hf"), aimv2_mlx.load(tmp_path / "mlx")
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["format"] == "aimv2-mlx"
    x = aimv2_mlx.preprocess(PHOTOS / "chelsea.jpg", a)
    assert np.array_equal(np.array(a(x)), np.array(b(x)))
    again = _aimv2("convert", str(tmp_path / "hf"), str(tmp_path / "mlx"), cache=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
