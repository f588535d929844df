"""Option mistakes and ordinary inputs at the `aimv2` command line:
each mistake is one line on stderr and exit code 1, before any work or any file is made."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.cli.app import command
from aimv2_mlx.layers import block_indices
from aimv2_mlx.probe import ProbeSettings

import click
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from .conftest import one_line_error, run_cli

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"
PHOTO = PHOTOS / "chelsea.jpg"


@pytest.fixture
def labelled(tmp_path) -> Path:
    """An ImageFolder of two classes, two photos each."""
    root = tmp_path / "labelled"
    for label, names in (("a", ("chelsea", "coffee")), ("b", ("astronaut", "rocket"))):
        (root / label).mkdir(parents=True)
        for name in names:
            shutil.copy(PHOTOS / f"{name}.jpg", root / label / f"{name}.jpg")
    return root


# item 4: block indices never wrap


def test_block_indices_outside_the_depth_are_refused_naming_the_depth():
    assert block_indices((0, -1, -4, 3), 4) == [0, 3, 0, 3]
    for wanted in ((-6, -1), (17,), (4,), (-5,)):
        with pytest.raises(ValueError, match="the model has 4 blocks"):
            block_indices(wanted, 4)
    with pytest.raises(ValueError, match="not a block number"):
        block_indices(("last",), 4)


def test_forward_features_refuses_a_block_past_the_last():
    model = aimv2_mlx.load("bundled")
    depth = model.config.vision.num_hidden_layers
    pixels = mx.zeros((1, model.config.vision.image_size, model.config.vision.image_size, 3))
    _, outputs = model.forward_features(pixels, feature_blocks=(-depth, depth - 1))
    assert len(outputs) == 2
    with pytest.raises(ValueError, match=f"the model has {depth} blocks"):
        model.forward_features(pixels, feature_blocks=(depth + 13,))


@pytest.mark.parametrize("blocks", ["-6,-1", "17"])
def test_probe_blocks_out_of_range_are_one_line_before_any_output(labelled, tmp_path, blocks):
    out = tmp_path / "probe"
    result = run_cli("probe", labelled, "-o", out, "-m", "bundled", "--blocks", blocks)
    one_line_error(result, "the model has 4 blocks")
    assert not out.exists()


# item 5: numbers checked before any work


@pytest.mark.parametrize(
    "args, flag",
    [
        (["data", "shapes", "{out}", "--n", "-5"], "--n -5"),
        (["data", "shapes", "{out}", "--n", "0"], "--n 0"),
        (["data", "shapes", "{out}", "--size", "5"], "--size 5"),
        (["pretrain", "{data}", "-o", "{out}", "--steps", "0"], "--steps 0"),
        (["pretrain", "{data}", "-o", "{out}", "-b", "0"], "--batch-size 0"),
        (["pretrain", "{data}", "-o", "{out}", "--lr", "0"], "--lr 0"),
        (["pretrain", "{data}", "-o", "{out}", "--context-length", "1"], "--context-length 1"),
        (["embed", "{data}", "-o", "{out}", "--max-megapixels", "0"], "--max-megapixels 0"),
        (["embed", "{data}", "-o", "{out}", "-b", "0"], "--batch-size 0"),
        (["embed", "{data}", "-o", "{out}", "--workers", "-1"], "--workers -1"),
        (["embed", "{data}", "-o", "{out}", "--shard-size", "0"], "--shard-size 0"),
        (["probe", "{data}", "-o", "{out}", "--val-fraction", "1.5"], "--val-fraction 1.5"),
        (["probe", "{data}", "-o", "{out}", "--epochs", "0"], "--epochs 0"),
        (["classify", "{data}", "-o", "{out}", "--top-k", "0"], "--top-k 0"),
        (["convert", "{data}", "{out}", "-q", "3"], "--q-bits 3"),
        (["tokenizer", "train", "{data}", "-o", "{out}", "--vocab-size", "0"], "--vocab-size 0"),
    ],
)
def test_a_number_out_of_range_is_one_line_and_nothing_is_made(tmp_path, args, flag):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    result = run_cli(*(a.format(data=data, out=out) for a in args))
    one_line_error(result, flag)
    assert not out.exists() and list(tmp_path.iterdir()) == [data]


def test_write_shapes_refuses_no_images_and_tiny_sides(tmp_path):
    from aimv2_mlx.data.shapes import MIN_SIZE, write_shapes

    for n, size in ((0, 112), (-5, 112), (3, MIN_SIZE - 1)):
        with pytest.raises(ValueError, match="at least"):
            write_shapes(tmp_path / "shapes", n, size)
    assert not (tmp_path / "shapes").exists()


# item 7: ordinary inputs and raw library messages


def test_embed_takes_a_single_image_file_as_the_image_to_embed(tmp_path):
    out = tmp_path / "vectors"
    result = run_cli("embed", PHOTO, "-o", out, "-m", "bundled")
    assert result.exit_code == 0, result.output
    assert "embedded 1 of 1" in result.stdout
    vectors, metadata = aimv2_mlx.read_embeddings(out)
    assert metadata.column("path").to_pylist() == ["chelsea.jpg"]
    reference = aimv2_mlx.embed([PHOTO], aimv2_mlx.load("bundled"), batch_size=1)
    assert np.abs(vectors - reference).max() <= 1e-5


def test_probe_of_one_image_says_what_a_probe_needs_and_makes_no_folder(tmp_path):
    one_line_error(
        run_cli("probe", PHOTO, "-o", tmp_path / "p", "-m", "bundled"), str(PHOTO), "path,label"
    )
    assert not (tmp_path / "p").exists()


def test_probe_of_a_binary_label_file_is_a_sentence_not_a_decode_error(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_bytes(PHOTO.read_bytes())
    one_line_error(
        run_cli("probe", labels, "-o", tmp_path / "p", "-m", "bundled"), str(labels), "UTF-8"
    )


def test_blocks_that_are_not_numbers_are_a_sentence(labelled, tmp_path):
    line = one_line_error(
        run_cli("probe", labelled, "-o", tmp_path / "p", "--blocks", "last"), "--blocks 'last'"
    )
    assert "invalid literal" not in line


def test_convert_of_an_image_says_it_is_not_a_checkpoint(tmp_path):
    out = tmp_path / "model"
    one_line_error(run_cli("convert", PHOTO, out), str(PHOTO), "not a checkpoint")
    assert not out.exists()


# item 9: every path expands ~


def test_probe_settings_take_a_str_cache_dir_with_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ProbeSettings(cache_dir="~/features").cache_dir == tmp_path / "features"
    assert ProbeSettings(blocks=[-1]).blocks == (-1,)


def test_api_and_cli_paths_expand_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos").mkdir()
    shutil.copy(PHOTO, tmp_path / "photos" / PHOTO.name)
    model = aimv2_mlx.load("bundled")
    summary = aimv2_mlx.embed_folder("~/photos", "~/out", model)
    vectors, _ = aimv2_mlx.read_embeddings("~/out")
    assert (
        summary.embedded == 1
        and (tmp_path / "out" / "manifest.json").is_file()
        and vectors.shape[0] == 1
    )
    assert np.array_equal(
        np.asarray(aimv2_mlx.preprocess("~/photos/chelsea.jpg", model)),
        np.asarray(aimv2_mlx.preprocess(PHOTO, model)),
    )
    result = run_cli("data", "shapes", "~/shapes", "--n", "2", "--size", "28")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "shapes" / "images").glob("*.png"))) == 2
    result = run_cli("embed", "~/photos", "-o", "~/cli-out", "-m", "bundled")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli-out" / "manifest.json").is_file() and not Path("~").exists()


# item 16: help and version


def _commands(group: click.Command, path: str = "aimv2"):
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, f"{path} {name}")


def test_help_shows_no_python_types_and_every_option_has_help():
    root = command()
    for path, cmd in _commands(root):
        result = CliRunner().invoke(root, [*path.split()[1:], "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        assert not re.search(r"<(bool|str|int|float|path|list\[\w+\])>", result.output), (
            path,
            result.output,
        )
        undocumented = [p.opts for p in cmd.params if p.param_type_name == "option" and not p.help]
        assert not undocumented, (path, undocumented)


def test_pretrain_run_folder_is_output_like_everywhere_and_out_still_works(tmp_path):
    for spelling in ("--output", "--out", "-o"):
        result = run_cli("pretrain", tmp_path, spelling, tmp_path / "run", "--steps", "0")
        one_line_error(result, "--steps 0")
    for path, cmd in _commands(command()):
        for param in cmd.params:
            assert "-o" not in param.opts or "--output" in param.opts, (path, param.opts)


def test_version_prints_the_package_version():
    result = run_cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"aimv2-mlx {aimv2_mlx.__version__}"
