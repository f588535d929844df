"""`aimv2 pretrain` says what it is about to do, and how long is left, as it goes."""

from __future__ import annotations

import re

import aimv2_mlx
from aimv2_mlx.config import DecoderConfig, EncoderConfig
from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.loop import pretrain
from aimv2_mlx.train.summary import eta

import pytest


def test_pretraining_prints_a_startup_summary_and_an_eta_in_every_step_line(tmp_path):
    source = load_captioned(write_shapes(tmp_path / "data", 12, size=28))
    tokenizer = train_tokenizer(source.captions(), 64, 10)
    config = PretrainConfig(
        encoder=EncoderConfig(32, 2, 2, 64, image_size=28),
        decoder=DecoderConfig(32, 1, 2, 64, tokenizer.vocab_size, 10),
        batch_size=4,
        steps=3,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=100,
        sample_every=2,
        compile=False,
    )
    lines = []
    pretrain(
        source,
        tmp_path / "run",
        config,
        tokenizer,
        echo=lambda message: lines.extend(message.splitlines()),
    )
    encoder = aimv2_mlx.load(tmp_path / "run" / "checkpoints" / "step-00000003" / "encoder")
    summary = " ".join(lines[:3])
    assert lines[3].startswith("step 1/3")
    assert (
        f"{aimv2_mlx.parameter_count(encoder):,} encoder" in summary
        and "multimodal objective" in summary
    )
    assert (
        "data: 12 images" in summary
        and "3 steps of batch 4" in summary
        and "~1.0 epochs" in summary
    )
    assert f"outputs in {tmp_path / 'run'}/" in summary and "samples/ every 2 steps" in summary
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 3 and all(re.search(r", eta \d+s$", line) for line in steps)
    assert steps[-1].endswith("eta 0s")
    assert (tmp_path / "run" / "samples" / "step-00000002.png").is_file() and (
        tmp_path / "run" / "loss.png"
    ).is_file()


@pytest.mark.parametrize(
    "seconds, done, remaining, shown",
    [(10.0, 2, 3, "15s"), (60.0, 1, 2, "2m00s"), (3600.0, 3, 4, "1h20m"), (5.0, 5, 0, "0s")],
)
def test_eta_is_the_mean_pace_times_the_steps_left(seconds, done, remaining, shown):
    assert eta(seconds, done, remaining) == shown
