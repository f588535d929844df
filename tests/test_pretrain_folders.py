"""What `aimv2 pretrain` owns in its run folder: a new run refuses a user's folder, and `--resume`
falls back to the newest complete checkpoint (saying which) or refuses, never restarting
silently."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.loop import pretrain

import pytest

from .test_pretrain import assert_same_weights, tiny_run, weights_of

ENV = {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 12-step run straight through, and the same run stopped after step 8 (checkpoints 4, 8)."""
    root = tmp_path_factory.mktemp("runs")
    source = load_captioned(write_shapes(root / "data", 16, size=28))
    tok = train_tokenizer(source.captions(), 64, 10)
    cfg = tiny_run(tok, steps=12, checkpoint_every=4)
    pretrain(source, root / "straight", cfg, tok, echo=lambda *_: None)
    pretrain(source, root / "half", cfg, tok, until=8, echo=lambda *_: None)
    return source, root / "straight", root / "half"


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _resume(source, run: Path) -> tuple[dict, list[str]]:
    said = []
    record = pretrain(source, run, resume=True, echo=said.append)
    return record, said


def _log_steps(run: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("pointer", [None, b"\xff\xfe garbage", b"step-00000099\n"])
def test_resume_without_a_usable_latest_pointer_takes_the_newest_checkpoint_and_says_so(
    runs, tmp_path, pointer
):
    source, straight, half = runs
    run = shutil.copytree(half, tmp_path / "run")
    latest = run / "checkpoints" / "latest"
    latest.unlink() if pointer is None else latest.write_bytes(pointer)
    record, said = _resume(source, run)
    assert record["step"] == 12 and "step-00000008" in said[0] and "latest pointer" in said[0]
    assert_same_weights(weights_of(straight), weights_of(run))
    assert _log_steps(run) == list(range(1, 13))


@pytest.mark.parametrize("damage", ["optimizer", "truncated", "state"])
def test_a_broken_newest_checkpoint_falls_back_to_the_one_before_and_leaves_it_alone(
    runs, tmp_path, damage
):
    source, straight, half = runs
    run = shutil.copytree(half, tmp_path / "run")
    newest = run / "checkpoints" / "step-00000008"
    if damage == "optimizer":
        (newest / "optimizer.safetensors").unlink()
    elif damage == "truncated":
        data = (newest / "decoder.safetensors").read_bytes()
        (newest / "decoder.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (newest / "state.json").write_text('{"step": "eight"')
    good = _tree(run / "checkpoints" / "step-00000004")
    record, said = _resume(source, run)
    assert record["step"] == 12
    assert (
        "resuming from" in said[0] and "step-00000004" in said[0] and "step-00000008 (" in said[0]
    )
    assert _tree(run / "checkpoints" / "step-00000004") == good
    assert_same_weights(weights_of(straight), weights_of(run))
    assert _log_steps(run) == list(range(1, 13))


def test_resume_with_no_complete_checkpoint_refuses_and_changes_nothing(runs, tmp_path):
    source, _, half = runs
    run = shutil.copytree(half, tmp_path / "run")
    for folder in (run / "checkpoints").glob("step-*"):
        (folder / "optimizer.safetensors").unlink()
    before = _tree(run)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2_mlx.cli",
            "pretrain",
            str(tmp_path / "data"),
            "-o",
            str(run),
            "--resume",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 1  # the data folder is missing: the run is never started
    with pytest.raises(
        ValueError, match=r"no complete checkpoint to resume from.*step-00000008.*step-00000004"
    ):
        _resume(source, run)
    assert _tree(run) == before


def test_a_torn_last_log_line_does_not_block_resume(runs, tmp_path):
    source, _straight, half = runs
    run = shutil.copytree(half, tmp_path / "run")
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 9, "loss": 0.')
    record, _said = _resume(source, run)
    assert record["step"] == 12 and _log_steps(run) == list(range(1, 13))


def test_pruning_never_removes_the_checkpoint_it_resumed_from(runs, tmp_path):
    source, _straight, half = runs
    run = shutil.copytree(half, tmp_path / "run")
    for step in (20, 24, 28):  # leftovers of a timeline that was never completed
        shutil.copytree(
            run / "checkpoints" / "step-00000008", run / "checkpoints" / f"step-{step:08d}"
        )
        (run / "checkpoints" / f"step-{step:08d}" / "optimizer.safetensors").unlink()
    record, _ = _resume(source, run)
    assert record["step"] == 12
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert {"step-00000004", "step-00000008", "step-00000012"} <= set(kept)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000012"


def test_a_new_run_refuses_a_folder_holding_a_users_config_and_tokenizer(tmp_path):
    data = write_shapes(tmp_path / "data", 4, size=28)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "tokenizer.json").write_text('{"my": "tokenizer"}')
    before = _tree(mine)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2_mlx.cli",
            "pretrain",
            str(data),
            "-o",
            str(mine),
            "--width",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--image-size",
            "28",
            "--steps",
            "1",
            "--no-compile",
            "-b",
            "2",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert (
        "not empty and not an aimv2 pretrain run folder" in result.stderr
        and str(mine) in result.stderr
    )
    assert _tree(mine) == before and sorted(p.name for p in mine.iterdir()) == [
        "config.json",
        "tokenizer.json",
    ]


def test_a_new_run_into_a_photo_folder_is_refused_before_writing(runs, tmp_path):
    source, _, _ = runs
    photos = tmp_path / "photos"
    shutil.copytree(Path(source.origin) / "images", photos)
    before = _tree(photos)
    tok = train_tokenizer(source.captions(), 64, 10)
    with pytest.raises(FileExistsError, match="not an aimv2 pretrain run folder"):
        pretrain(source, photos, tiny_run(tok, steps=1), tok, echo=lambda *_: None)
    assert _tree(photos) == before and not (photos / ".aimv2.lock").exists()


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Shapes data with one image replaced by garbage (its caption kept)."""
    root = tmp_path_factory.mktemp("broken")
    data = write_shapes(root / "data", 16, size=28)
    bad = sorted((data / "images").glob("*.png"))[5]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    source = load_captioned(data)
    return source, train_tokenizer(source.captions(), 64, 10), bad.name


def test_an_unreadable_image_is_replaced_listed_once_and_resume_stays_exact(broken, tmp_path):
    import json

    source, tok, bad = broken
    cfg = tiny_run(tok, steps=12, checkpoint_every=4)
    straight = pretrain(source, tmp_path / "straight", cfg, tok, echo=lambda *_: None)
    pretrain(source, tmp_path / "resumed", cfg, tok, until=6, echo=lambda *_: None)
    resumed = pretrain(source, tmp_path / "resumed", resume=True, echo=lambda *_: None)
    assert (
        straight["step"] == resumed["step"] == 12 and straight["skipped"] == resumed["skipped"] == 1
    )
    assert_same_weights(weights_of(tmp_path / "straight"), weights_of(tmp_path / "resumed"))
    failures = {
        run: [
            json.loads(line)
            for line in (tmp_path / run / "failures.jsonl").read_text().splitlines()
        ]
        for run in ("straight", "resumed")
    }
    assert len(failures["straight"]) == 1 and bad in failures["straight"][0]["sample"]
    assert "not a readable image" in failures["straight"][0]["reason"]
    first = failures["straight"][0]
    assert [(f["sample"], f["step"]) for f in failures["resumed"]] == [
        (first["sample"], first["step"])
    ]


def test_strict_stops_at_the_unreadable_image_and_names_it(broken, tmp_path):
    from aimv2_mlx.images import ImageError

    source, tok, bad = broken
    with pytest.raises(ImageError, match=bad):
        pretrain(
            source,
            tmp_path / "run",
            tiny_run(tok, steps=12),
            tok,
            strict=True,
            echo=lambda *_: None,
        )


def test_resume_on_other_data_is_refused_unless_allowed(runs, tmp_path):
    import json

    source, _, half = runs
    run = shutil.copytree(half, tmp_path / "run")
    recorded = json.loads((run / "data.json").read_text())
    assert recorded["samples"] == 16 and len(recorded["sha256"]) == 16
    fewer = load_captioned(source.origin)
    fewer.samples = fewer.samples[:-1]
    before = _tree(run)
    with pytest.raises(ValueError, match=r"15 samples.*trained on 16.*--allow-data-change"):
        pretrain(fewer, run, resume=True, echo=lambda *_: None)
    assert _tree(run) == before
    said = []
    assert pretrain(fewer, run, resume=True, allow_data_change=True, echo=said.append)["step"] == 12
    assert (
        said[0].startswith("warning:")
        and json.loads((run / "data.json").read_text())["samples"] == 15
    )


def test_a_second_pretrain_on_a_locked_run_says_which_pid_holds_it(runs, tmp_path):
    from aimv2_mlx.folders import FolderInUseError, locked

    source, _, half = runs
    run = shutil.copytree(half, tmp_path / "run")
    before = _tree(run)
    with locked(run), pytest.raises(FolderInUseError, match=f"in use by PID {os.getpid()}"):
        pretrain(source, run, resume=True, echo=lambda *_: None)
    assert _tree(run) == before
