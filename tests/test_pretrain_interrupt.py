"""Ctrl-C and SIGTERM keep a pre-training run (a checkpoint at the step just finished and the
command that continues it), checkpoints also come by wall time, and `--resume` uses or refuses
every option it is given."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.checkpoint import read_pointer, resume_point
from aimv2_mlx.train.loop import pretrain

import pytest

from .test_pretrain import assert_same_weights, tiny_run, weights_of

ENV = {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
AIMV2 = [sys.executable, "-m", "aimv2_mlx.cli"]
STEPS = 40
# Big enough that a step takes tens of milliseconds: the signal lands long before the run ends.
TINY = [
    "--width",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--image-size",
    "56",
    "--decoder-depth",
    "1",
    "-b",
    "8",
    "--no-compile",
    "--context-length",
    "12",
    "--log-every",
    "1",
    "--checkpoint-every",
    "1000",
]


def _aimv2(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*AIMV2, *args], capture_output=True, text=True, env=ENV, timeout=300)


def _log(run: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in records]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Shapes data, a tokenizer, and the whole run without interruption."""
    root = tmp_path_factory.mktemp("interrupt")
    data = write_shapes(root / "data", 16, size=56)
    tokenizer = root / "tokenizer.json"
    assert (
        _aimv2(
            "tokenizer", "train", str(data), "-o", str(tokenizer), "--vocab-size", "80"
        ).returncode
        == 0
    )
    result = _aimv2(
        "pretrain",
        str(data),
        "-o",
        str(root / "straight"),
        *TINY,
        "--steps",
        str(STEPS),
        "--tokenizer",
        str(tokenizer),
    )
    assert result.returncode == 0, result.stderr
    return data, tokenizer, root / "straight"


def _interrupt(
    data: Path, tokenizer: Path, run: Path, number: int, after: int = 3
) -> tuple[int, str]:
    """Start `aimv2 pretrain` in a child process and send it `number` once it has printed step
    `after`.
    """
    child = subprocess.Popen(
        [
            *AIMV2,
            "pretrain",
            str(data),
            "-o",
            str(run),
            *TINY,
            "--steps",
            str(STEPS),
            "--tokenizer",
            str(tokenizer),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        for line in child.stdout:
            if line.startswith(f"step {after}/"):
                child.send_signal(number)
                break
        _, stderr = child.communicate(timeout=300)
    finally:
        child.kill()
    return child.returncode, stderr


@pytest.mark.parametrize(("number", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_run_saves_its_step_says_how_to_continue_and_resumes_to_the_same_weights(
    straight, tmp_path, number, code
):
    data, tokenizer, whole = straight
    run = tmp_path / "run"
    returncode, stderr = _interrupt(data, tokenizer, run, number)
    assert returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    step = int(last.split()[3].rstrip(";"))
    assert 3 <= step < STEPS, last
    command = shlex.join(["aimv2", "pretrain", str(data), "-o", str(run), "--resume"])
    assert (
        last == f"interrupted at step {step}; continue with: {command}"
        and "Traceback" not in stderr
    )
    checkpoint = run / "checkpoints" / f"step-{step:08d}"
    assert read_pointer(run)[0] == checkpoint.name and resume_point(run) == (checkpoint, None)
    assert json.loads((checkpoint / "state.json").read_text())["step"] == step
    resumed = subprocess.run(
        [*AIMV2, *shlex.split(last.split("continue with: ")[1])[1:]],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step}" in resumed.stdout and f"step {STEPS}/{STEPS}" in resumed.stdout
    assert _log(run) == _log(whole) and [s for s, _, _ in _log(run)] == list(range(1, STEPS + 1))
    assert_same_weights(weights_of(whole), weights_of(run))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    source = load_captioned(write_shapes(root / "data", 16, size=28))
    return source, train_tokenizer(source.captions(), 64, 10)


@pytest.mark.parametrize(("minutes", "kept"), [(1e-9, [4, 5, 6]), (0, [6])])
def test_checkpoints_come_by_wall_time_as_well_as_by_steps(shapes, tmp_path, minutes, kept):
    source, tok = shapes
    handlers = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]
    pretrain(
        source,
        tmp_path / "run",
        tiny_run(tok, steps=6, checkpoint_minutes=minutes),
        tok,
        echo=lambda *_: None,
    )
    assert [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert (
        sorted(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == kept
    )


def test_resume_with_more_steps_extends_the_run_on_the_longer_runs_schedule(shapes, tmp_path):
    source, tok = shapes
    longer = tmp_path / "longer"
    pretrain(source, longer, tiny_run(tok, steps=20), tok, echo=lambda *_: None)
    run = tmp_path / "run"
    pretrain(source, run, tiny_run(tok, steps=12), tok, echo=lambda *_: None)
    said = []
    record = pretrain(source, run, resume=True, changes={"steps": 20}, echo=said.append)
    assert record["step"] == 20 and json.loads((run / "config.json").read_text())["steps"] == 20
    assert any(
        "now ends at step 20 (was 12)" in line and "at step 12 goes from" in line for line in said
    )
    lr = {s: r for s, _, r in _log(run)}
    assert [lr[s] for s in range(13, 21)] == [r for s, _, r in _log(longer) if s > 12]
    assert [s for s, _, _ in _log(run)] == list(range(1, 21))


def test_resume_refuses_fewer_steps_than_done_and_settings_it_cannot_change(shapes, tmp_path):
    source, tok = shapes
    run = tmp_path / "run"
    pretrain(source, run, tiny_run(tok, steps=6), tok, echo=lambda *_: None)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="--steps 4: the run is already at step 6"):
        pretrain(source, run, resume=True, changes={"steps": 4}, echo=lambda *_: None)
    with pytest.raises(ValueError, match="keeps its peak_lr"):
        pretrain(source, run, resume=True, changes={"peak_lr": 0.1}, echo=lambda *_: None)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    said = []
    pretrain(source, run, resume=True, echo=said.append)
    assert any(
        "the run is complete (6 of 6 steps); pass --steps N to extend it" in line for line in said
    )


def test_the_cli_refuses_options_a_resumed_run_cannot_take_in_one_line(straight, tmp_path):
    data, _, whole = straight
    run = shutil.copytree(whole, tmp_path / "run")
    for extra, said in (
        (["--lr", "0.1", "--seed", "3"], "--lr, --seed: a resumed run keeps the settings in"),
        (["--steps", "10"], f"--steps 10: the run is already at step {STEPS}"),
    ):
        result = _aimv2("pretrain", str(data), "-o", str(run), "--resume", *extra)
        assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
        assert said in result.stderr


def test_a_default_warmup_longer_than_the_run_is_clamped_and_a_given_one_refused(
    straight, tmp_path
):
    data, tokenizer, _ = straight
    result = _aimv2(
        "pretrain",
        str(data),
        "-o",
        str(tmp_path / "refused"),
        *TINY,
        "--steps",
        "2",
        "--warmup-steps",
        "5",
        "--tokenizer",
        str(tokenizer),
    )
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "--warmup-steps 5 is longer than the run (--steps 2)" in result.stderr
    assert not (tmp_path / "refused").exists()
    result = _aimv2(
        "pretrain",
        str(data),
        "-o",
        str(tmp_path / "clamped"),
        *TINY,
        "--steps",
        "20",
        "--tokenizer",
        str(tokenizer),
    )
    assert result.returncode == 0, result.stderr
    assert (
        "default warmup (100 steps) is longer than this 20-step run; warming up for 2 steps"
        in result.stdout
    )
    assert json.loads((tmp_path / "clamped" / "config.json").read_text())["warmup_steps"] == 2
