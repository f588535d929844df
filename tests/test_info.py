"""`aimv2 info`: a readable config, an int parameter count, quantization, and the way from a
pre-training run to a model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import aimv2_mlx
from aimv2_mlx.config import DecoderConfig, EncoderConfig
from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.loop import pretrain


def _aimv2(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_DISABLE_COMPILE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", *args], capture_output=True, text=True, env=env
    )


def test_info_prints_the_config_on_short_lines_and_the_parameters_as_an_int(tmp_path):
    text = _aimv2("info", "bundled")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    vision = aimv2_mlx.load("bundled").config.vision
    assert any(
        line.strip().startswith("vision:") and f"hidden_size={vision.hidden_size}" in line
        for line in lines
    )
    assert any(line.strip() == "quantization: none" for line in lines)
    summary = json.loads(_aimv2("info", "bundled", "--json").stdout)
    assert summary["parameters"] == aimv2_mlx.parameter_count(aimv2_mlx.load("bundled"))


def test_info_shows_the_quantization_of_a_quantized_folder(tmp_path):
    converted = _aimv2("convert", "bundled", str(tmp_path / "q8"), "-q", "8")
    assert converted.returncode == 0, converted.stderr
    group_size = json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"][
        "group_size"
    ]
    text = _aimv2("info", str(tmp_path / "q8"))
    assert f"quantization: 8-bit, group size {group_size}" in text.stdout
    summary = json.loads(_aimv2("info", str(tmp_path / "q8"), "--json").stdout)
    assert summary["quantization"].startswith("8-bit")
    # not the packed count
    assert summary["parameters"] == aimv2_mlx.parameter_count(aimv2_mlx.load("bundled"))


def test_info_on_a_pretraining_run_describes_its_checkpoint_and_hints_at_export(tmp_path):
    source = load_captioned(write_shapes(tmp_path / "data", 8, size=28))
    tokenizer = train_tokenizer(source.captions(), 64, 10)
    config = PretrainConfig(
        encoder=EncoderConfig(32, 2, 2, 64, image_size=28),
        decoder=DecoderConfig(32, 1, 2, 64, tokenizer.vocab_size, 10),
        batch_size=4,
        steps=2,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=2,
        compile=False,
    )
    pretrain(source, tmp_path / "run", config, tokenizer, echo=lambda *_: None)
    result = _aimv2("info", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert (
        "pre-training run" in result.stdout and f"aimv2 export {tmp_path / 'run'}" in result.stdout
    )
    summary = json.loads(_aimv2("info", str(tmp_path / "run"), "--json").stdout)
    assert (
        summary["run"]["checkpoint"].endswith("step-00000002")
        and summary["config"]["vision"]["hidden_size"] == 32
    )
