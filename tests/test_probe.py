"""`probe()` end to end: splits, the feature cache, bad input, saved heads and `classify
--probe`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.config import PreprocessConfig
from aimv2_mlx.encoder import VisionEncoder
from aimv2_mlx.probe import (
    HEADS,
    AttentiveSettings,
    ProbeClassifier,
    ProbeDataError,
    ProbeSettings,
    load_probe,
    probe,
)

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from .conftest import tiny_config

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def _image_folder(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Noisy images whose dominant colour is their class."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture
def model():
    mx.random.seed(0)
    encoder = aimv2_mlx.build(tiny_config())
    encoder.preprocessor.pos_embed = mx.random.normal(encoder.preprocessor.pos_embed.shape) * 0.5
    return encoder


@pytest.fixture
def encoder_calls(monkeypatch):
    calls = []
    original = VisionEncoder.__call__

    def counting(self, pixels, *args, **kwargs):
        calls.append(pixels.shape[0])
        return original(self, pixels, *args, **kwargs)

    monkeypatch.setattr(VisionEncoder, "__call__", counting)
    return calls


def _settings(tmp_path: Path, **overrides) -> ProbeSettings:
    base = dict(
        heads=("linear", "knn"),
        val_fraction=0.25,
        test_fraction=0.25,
        cache_dir=tmp_path / "cache",
        ks=(3, 5),
        attentive=AttentiveSettings(epochs=5, batch_size=8),
    )
    return ProbeSettings(**{**base, **overrides})


def test_probe_writes_metrics_split_and_heads(tmp_path, model):
    data = _image_folder(tmp_path / "data")
    report = probe(
        data,
        tmp_path / "out",
        model,
        settings=_settings(tmp_path, heads=("linear", "knn", "attentive")),
        log=lambda message: None,
    )
    assert report["counts"] == {"train": 12, "val": 6, "test": 6}
    for name in ("linear", "knn", "attentive"):
        metrics = report["heads"][name]
        assert (
            set(metrics["per_class"]) == set(COLOURS)
            and sum(map(sum, metrics["confusion_matrix"])) == 6
        )
    assert report["heads"]["linear"]["top1"] >= 0.8  # colour is easy even for a random encoder
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    names = [row["path"] for part in ("train", "val", "test") for row in split[part]]
    assert len(names) == len(set(names)) == 24  # a partition
    assert all(sum(row["label"] == c for row in split["test"]) == 2 for c in COLOURS)  # stratified
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["heads"]["knn"]["top1"] == report["heads"]["knn"]["top1"]
    for name in ("probe.json", "linear.safetensors", "knn.safetensors", "attentive.safetensors"):
        assert (tmp_path / "out" / name).is_file()


def test_a_second_run_into_the_same_folder_leaves_no_heads_of_the_first(tmp_path, model):
    data, out = _image_folder(tmp_path / "data"), tmp_path / "out"
    probe(
        data,
        out,
        model,
        settings=_settings(tmp_path, heads=("linear", "knn")),
        log=lambda message: None,
    )
    (out / "notes.txt").write_text("mine")
    assert (out / "linear.safetensors").is_file()
    probe(data, out, model, settings=_settings(tmp_path, heads=("knn",)), log=lambda message: None)
    assert not (out / "linear.safetensors").exists() and (out / "knn.safetensors").is_file()
    assert not any(out.glob("confusion-linear*")) and (out / "notes.txt").read_text() == "mine"
    assert list(json.loads((out / "probe.json").read_text())["heads"]) == ["knn"]


def test_second_run_reads_the_cache_and_new_preprocessing_does_not(tmp_path, model, encoder_calls):
    data = _image_folder(tmp_path / "data")
    settings = _settings(tmp_path)
    probe(data, tmp_path / "first", model, settings=settings, log=lambda m: None)
    first = len(encoder_calls)
    assert first > 0
    probe(data, tmp_path / "second", model, settings=settings, log=lambda m: None)
    assert len(encoder_calls) == first  # no encoder call at all
    model.config.preprocess = PreprocessConfig.for_mode("ml-aim", 56)
    probe(data, tmp_path / "third", model, settings=settings, log=lambda m: None)
    assert len(encoder_calls) > first


def test_token_cache_serves_a_later_mean_request(tmp_path, model, encoder_calls):
    data = _image_folder(tmp_path / "data")
    probe(
        data,
        tmp_path / "a",
        model,
        settings=_settings(tmp_path, heads=("attentive",)),
        log=lambda m: None,
    )
    calls = len(encoder_calls)
    probe(
        data,
        tmp_path / "b",
        model,
        settings=_settings(tmp_path, heads=("linear",)),
        log=lambda m: None,
    )
    assert len(encoder_calls) == calls


def test_bad_images_and_empty_class_are_reported_not_fatal(tmp_path, model):
    data = _image_folder(tmp_path / "data")
    (data / "empty").mkdir()
    (data / "red" / "notes.jpg").write_text("not an image")
    cut = (data / "green" / "00.png").read_bytes()
    (data / "green" / "cut.png").write_bytes(cut[: len(cut) // 2])
    messages = []
    report = probe(data, tmp_path / "out", model, settings=_settings(tmp_path), log=messages.append)
    assert any("empty" in m and "skipped" in m for m in messages)
    failures = [
        json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()
    ]
    assert sorted(Path(f["path"]).name for f in failures) == ["cut.png", "notes.jpg"]
    assert all(f["reason"] for f in failures)
    assert report["failed"] == 2 and "empty" not in report["classes"]


def test_label_file_with_missing_images_excludes_and_lists_them(tmp_path, model):
    data = _image_folder(tmp_path / "data")
    rows = ["path,label"] + [
        f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.png"))
    ]
    rows += ["red/gone.png,red", "blue/also-gone.png,blue"]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    messages = []
    report = probe(
        data / "labels.csv",
        tmp_path / "out",
        model,
        settings=_settings(tmp_path),
        log=messages.append,
    )
    assert any("2 listed image(s) do not exist" in m and "gone.png" in m for m in messages)
    listed = (tmp_path / "out" / "failures.jsonl").read_text()
    assert "red/gone.png" in listed and "blue/also-gone.png" in listed
    assert sum(report["counts"].values()) == 24


@pytest.mark.parametrize("case", ["single-class", "nothing"])
def test_unusable_data_is_a_clear_error(tmp_path, model, case):
    data = tmp_path / "data"
    if case == "single-class":
        _image_folder(data)
        for name in ("green", "blue"):
            for p in (data / name).iterdir():
                p.unlink()
            (data / name).rmdir()
        match = "only one class"
    else:
        data.mkdir()
        match = "no class folders"
    with pytest.raises(ProbeDataError, match=match):
        probe(data, tmp_path / "out", model, settings=_settings(tmp_path), log=lambda m: None)


def test_cli_single_class_is_one_line_exit_1(tmp_path):
    (tmp_path / "data" / "only").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "data" / "only" / "a.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2_mlx.cli",
            "probe",
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            "bundled",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "only one class" in result.stderr


def test_saved_probe_classifies_new_images(tmp_path, model):
    data = _image_folder(tmp_path / "data")
    aimv2_mlx.save(model, tmp_path / "encoder")
    encoder = aimv2_mlx.load(tmp_path / "encoder")  # the probe records where its encoder came from
    probe(
        data,
        tmp_path / "out",
        encoder,
        settings=_settings(tmp_path, heads=("linear", "knn")),
        log=lambda m: None,
    )
    fresh = sorted(_image_folder(tmp_path / "fresh", per_class=3, seed=1).rglob("*.png"))
    probabilities = ProbeClassifier(tmp_path / "out", head="linear")(fresh)
    assert probabilities.shape == (9, 3) and np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
    classes = sorted(COLOURS)
    correct = sum(
        classes[row.argmax()] == path.parent.name
        for row, path in zip(probabilities, fresh, strict=True)
    )
    assert correct >= 7
    knn = ProbeClassifier(tmp_path / "out", model=encoder, head="knn")(fresh)
    assert (knn.argmax(1) == probabilities.argmax(1)).mean() >= 0.7


def test_cli_classify_with_a_probe(tmp_path, model):
    data = _image_folder(tmp_path / "data")
    aimv2_mlx.save(model, tmp_path / "encoder")
    probe(
        data,
        tmp_path / "out",
        aimv2_mlx.load(tmp_path / "encoder"),
        settings=_settings(tmp_path),
        log=lambda m: None,
    )
    (tmp_path / "fresh").mkdir()
    Image.new("RGB", (30, 30), COLOURS["blue"]).save(tmp_path / "fresh" / "blue.png")
    (tmp_path / "fresh" / "broken.jpg").write_text("no")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2_mlx.cli",
            "classify",
            str(tmp_path / "fresh"),
            "--probe",
            str(tmp_path / "out"),
            "--top-k",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["labels"] == sorted(COLOURS) and len(report["results"]) == 1
    assert len(report["results"][0]["top"]) == 2 and len(report["skipped"]) == 1


def test_classify_with_a_probe_uses_and_names_the_head_with_the_best_validation_accuracy(
    tmp_path, model
):
    data = _image_folder(tmp_path / "data")
    aimv2_mlx.save(model, tmp_path / "encoder")
    # one epoch: far from the linear head
    weak_attentive = AttentiveSettings(epochs=1, batch_size=8)
    report = probe(
        data,
        tmp_path / "out",
        aimv2_mlx.load(tmp_path / "encoder"),
        settings=_settings(tmp_path, heads=("linear", "attentive"), attentive=weak_attentive),
        log=lambda m: None,
    )
    scores = {name: metrics["val_accuracy"] for name, metrics in report["heads"].items()}
    best = max(scores, key=scores.get)
    assert best == "linear" and scores["linear"] > scores["attentive"], scores
    Image.new("RGB", (30, 30), COLOURS["blue"]).save(tmp_path / "blue.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "aimv2_mlx.cli",
        "classify",
        str(tmp_path / "blue.png"),
        "--probe",
        str(tmp_path / "out"),
    ]
    chosen = subprocess.run(command + ["--json"], capture_output=True, text=True, env=env)
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["head"] == "linear"
    assert json.loads(chosen.stdout)["head_val_accuracy"] == pytest.approx(scores["linear"])
    told = subprocess.run(command, capture_output=True, text=True, env=env)
    assert told.stdout.splitlines()[0].startswith("probe head: linear")
    forced = subprocess.run(
        command + ["--head", "attentive", "--json"], capture_output=True, text=True, env=env
    )
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["head"] == "attentive"


def test_probe_reports_progress_for_every_split_and_head(tmp_path, model):
    data = _image_folder(tmp_path / "data")
    calls = []
    report = probe(
        data,
        tmp_path / "out",
        model,
        settings=_settings(tmp_path, heads=HEADS),
        log=lambda m: None,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    last = {stage: (done, total) for stage, done, total in calls}
    assert list(last) == [
        "features: train",
        "features: val",
        "features: test",
        "linear head",
        "knn head",
        "attentive head",
    ]
    for split in ("train", "val", "test"):
        assert last[f"features: {split}"] == (report["counts"][split],) * 2
    assert all(done == total for done, total in last.values())
    assert len([c for c in calls if c[0] == "attentive head"]) == 3 * 5  # 3 settings x 5 epochs


def test_cli_probe_shows_progress_bars_on_stderr(tmp_path, model):
    data = _image_folder(tmp_path / "data")
    aimv2_mlx.save(model, tmp_path / "encoder")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_DISABLE_COMPILE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2_mlx.cli",
            "probe",
            str(data),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(tmp_path / "encoder"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    for stage in ("features: train", "features: test", "linear head", "knn head"):
        assert stage in result.stderr, result.stderr


def test_a_probe_saved_without_validation_scores_takes_them_from_its_metrics(tmp_path, model):
    data = _image_folder(tmp_path / "data")
    report = probe(
        data,
        tmp_path / "out",
        model,
        settings=_settings(tmp_path, heads=("linear", "knn")),
        log=lambda m: None,
    )
    record = json.loads((tmp_path / "out" / "probe.json").read_text())
    for info in record["heads"].values():
        del info["val_accuracy"]  # as an older aimv2 probe wrote it
    (tmp_path / "out" / "probe.json").write_text(json.dumps(record))
    loaded = load_probe(tmp_path / "out")
    assert {name: info["val_accuracy"] for name, info in loaded.record["heads"].items()} == {
        name: metrics["val_accuracy"] for name, metrics in report["heads"].items()
    }
