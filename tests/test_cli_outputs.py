"""An unusable output path, or a typo, costs one line and leaves nothing
behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from aimv2_mlx.tokenizer import train_tokenizer

import pytest

from .conftest import one_line_error, run_cli

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


def _listing(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.fixture
def captioned(tmp_path) -> Path:
    """Four photos with .txt captions: data for pretrain and tokenizer train, images for embed
    and classify.
    """
    root = tmp_path / "captioned"
    root.mkdir()
    for name in PHOTO_NAMES:
        shutil.copy(PHOTOS / f"{name}.jpg", root / f"{name}.jpg")
        (root / f"{name}.txt").write_text(f"a photo of a {name}")
    return root


@pytest.fixture
def spots(tmp_path) -> dict[str, Path]:
    """Output paths a user can get wrong: an existing file, an existing folder, a folder that
    does not exist.
    """
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    return {
        "file": tmp_path / "notes.txt",
        "below_file": tmp_path / "notes.txt" / "out",
        "folder": tmp_path / "folder",
        "missing": tmp_path / "missing" / "out.csv",
    }


# Each command gets inputs that would fail later (a missing model, probe or data set): the output's
# line proves the output was checked first, before any model was loaded or any data read.
@pytest.mark.parametrize(
    "args, spot, reason",
    [
        (
            ["embed", "{data}", "-m", "{tmp}/no-model", "-o", "{spot}"],
            "file",
            "exists and is a file, not a folder",
        ),
        (
            ["embed", "{data}", "-m", "{tmp}/no-model", "-o", "{spot}"],
            "below_file",
            "is a file, not a folder",
        ),
        (
            ["pretrain", "{tmp}/no-data", "-o", "{spot}"],
            "file",
            "exists and is a file, not a folder",
        ),
        (
            ["pretrain", "{tmp}/no-data", "-o", "{spot}", "--resume"],
            "file",
            "exists and is a file, not a folder",
        ),
        (
            ["probe", "{tmp}/no-data", "-m", "{tmp}/no-model", "-o", "{spot}"],
            "file",
            "exists and is a file",
        ),
        (
            ["probe", "{tmp}/no-data", "-m", "{tmp}/no-model", "--cache-dir", "{spot}"],
            "file",
            "exists and is a file",
        ),
        (
            ["tokenizer", "train", "{tmp}/no-data", "-o", "{spot}"],
            "folder",
            "is a folder; give a file name",
        ),
        (
            ["tokenizer", "train", "{tmp}/no-data", "-o", "{spot}"],
            "missing",
            "does not exist; create it first",
        ),
        (
            ["classify", "{data}", "--probe", "{tmp}/no-probe", "-o", "{spot}"],
            "folder",
            "is a folder; give a file name",
        ),
        (
            ["classify", "{data}", "--probe", "{tmp}/no-probe", "-o", "{spot}"],
            "missing",
            "does not exist; create it",
        ),
        (["data", "shapes", "{spot}", "--n", "2"], "below_file", "is a file, not a folder"),
        (["data", "shapes", "{spot}", "--n", "2"], "folder", "already exists; choose a new folder"),
        (["export", "{tmp}/no-run", "{spot}"], "below_file", "is a file, not a folder"),
        (["export", "{tmp}/no-run", "{spot}"], "file", "already exists; choose a new folder"),
        (["convert", "{tmp}/no-checkpoint", "{spot}"], "below_file", "is a file, not a folder"),
    ],
)
def test_an_unusable_output_path_is_one_line_before_any_work(
    tmp_path, captioned, spots, args, spot, reason
):
    before = _listing(tmp_path)
    result = run_cli(*(a.format(data=captioned, tmp=tmp_path, spot=spots[spot]) for a in args))
    one_line_error(result, str(spots[spot]), reason)
    assert _listing(tmp_path) == before


def test_tokenizer_train_into_an_existing_folder_leaves_no_tmp_file_behind(tmp_path, captioned):
    result = run_cli("tokenizer", "train", captioned, "-o", tmp_path, "--vocab-size", "40")
    one_line_error(result, "is a folder")
    tokenizer = train_tokenizer([f"a photo of a {name}" for name in PHOTO_NAMES], 40)
    (tmp_path / "tokenizer.json").mkdir()
    before = _listing(tmp_path)
    with pytest.raises(OSError):
        # the library, called directly: the same guarantee
        tokenizer.save(tmp_path / "tokenizer.json")
    assert _listing(tmp_path) == before


def test_an_output_file_may_be_new_or_an_existing_file_in_an_existing_folder(tmp_path):
    """The check refuses only unusable paths: a new file in an existing folder is written."""
    from aimv2_mlx.cli.options import output_file

    assert output_file(tmp_path / "top5.csv") == tmp_path / "top5.csv"
    (tmp_path / "old.csv").write_text("image,rank,label,probability\n")
    assert output_file(tmp_path / "old.csv") == tmp_path / "old.csv"


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
    "--no-compile",
    "--context-length",
    "12",
    "--vocab-size",
    "60",
    "--log-every",
    "1",
]


@pytest.mark.parametrize(
    "typo, flag",
    [
        (["-b", "0"], "--batch-size 0"),
        (["--steps", "0"], "--steps 0"),
        (["--width", "33"], "width 33 is not divisible by 2 heads"),
        (["--objective", "pixels"], "unknown objective"),
        (["--tokenizer", "no-such-tokenizer.json"], "no-such-tokenizer.json"),
    ],
)
def test_a_typod_pretrain_leaves_no_run_folder_and_the_corrected_command_runs(
    tmp_path, captioned, typo, flag
):
    run = tmp_path / "run"
    one_line_error(
        run_cli("pretrain", captioned, "-o", run, *TINY, "--steps", "1", "-b", "2", *typo), flag
    )
    assert not run.exists()
    result = run_cli("pretrain", captioned, "-o", run, *TINY, "--steps", "1", "-b", "2")
    assert result.exit_code == 0, result.output
    assert "done: step 1" in result.stdout and (run / "checkpoints").is_dir()


def test_a_probe_split_left_empty_is_refused_before_its_folder_is_made(tmp_path):
    labelled = tmp_path / "labelled"
    for label, names in (("a", PHOTO_NAMES[:2]), ("b", PHOTO_NAMES[2:])):
        (labelled / label).mkdir(parents=True)
        for name in names:
            shutil.copy(PHOTOS / f"{name}.jpg", labelled / label / f"{name}.jpg")
    out = tmp_path / "probe"
    result = run_cli(
        "probe",
        labelled,
        "-o",
        out,
        "-m",
        "bundled",
        "--heads",
        "knn",
        "--cache-dir",
        tmp_path / "cache",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
    )
    one_line_error(result, "the val set is empty", "--val-dir")
    assert not out.exists()
    result = run_cli(
        "probe",
        labelled,
        "-o",
        out,
        "-m",
        "bundled",
        "--heads",
        "knn",
        "--cache-dir",
        tmp_path / "cache",
        "--val-dir",
        labelled,
        "--test-dir",
        labelled,
    )
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file()


def test_an_output_folder_without_write_permission_is_one_line(tmp_path, monkeypatch):
    """Root may write anywhere, so the permission answer is stubbed: what is checked is the path
    asked about.
    """
    from aimv2_mlx.cli import options

    asked, access = [], options.os.access

    def no_write_in_tmp_path(path, mode, **kwargs):
        if Path(path) != tmp_path:
            return access(path, mode, **kwargs)
        asked.append(Path(path))
        return False

    monkeypatch.setattr(options.os, "access", no_write_in_tmp_path)
    out = tmp_path / "new" / "vectors"
    result = run_cli("embed", PHOTOS, "-o", out, "-m", tmp_path / "no-model")
    one_line_error(result, str(out), f"no permission to write in {tmp_path}")
    assert asked == [tmp_path] and not (tmp_path / "new").exists()


def test_pretrain_from_python_refuses_a_too_large_tokenizer_before_writing_the_run(
    tmp_path, captioned
):
    from aimv2_mlx.folders import is_empty
    from aimv2_mlx.train.config import PretrainConfig
    from aimv2_mlx.train.loop import check_new_run, pretrain

    tokenizer = train_tokenizer([f"a photo of a {name}" for name in PHOTO_NAMES], 60, 12)
    config = PretrainConfig.from_preset(
        "tiny", tokenizer.vocab_size - 1, 12, steps=1, warmup_steps=0, batch_size=2, compile=False
    )
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=f"tokenizer has {tokenizer.vocab_size} tokens"):
        pretrain(captioned, run, config, tokenizer, echo=lambda line: None)
    assert is_empty(run)  # no config.json or tokenizer.json: the corrected call may use the folder
    check_new_run(run)
