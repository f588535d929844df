"""Decompression bombs are guarded in one place (aimv2_mlx/images.py), so the Python API and the
`aimv2` CLI refuse the same oversized image for the same reason, and neither changes Pillow's
process-wide limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.errors import SettingError
from aimv2_mlx.images import ImageError, open_image, pillow_megapixels

import pytest
from PIL import Image

from .conftest import one_line_error, png_bomb, run_cli

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "photos" / "chelsea.jpg"


@pytest.fixture(scope="module")
def bombed(tmp_path_factory) -> Path:
    """A folder of one photo and one 400-megapixel PNG (~50 KB on disk)."""
    root = tmp_path_factory.mktemp("bombed")
    shutil.copy(PHOTO, root / "chelsea.jpg")
    png_bomb(root / "bomb.png")
    return root


def _reasons(out: Path) -> dict[str, str]:
    lines = (out / "failures.jsonl").read_text().splitlines()
    return {Path(failure["path"]).name: failure["reason"] for failure in map(json.loads, lines)}


def test_the_api_and_the_cli_refuse_the_same_bomb_for_the_same_reason(bombed, tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    aimv2_mlx.embed_folder(bombed, tmp_path / "api", aimv2_mlx.load("bundled"))
    result = run_cli("embed", bombed, "-o", tmp_path / "cli", "-m", "bundled")
    assert result.exit_code == 0, result.output
    assert limit == Image.MAX_IMAGE_PIXELS  # the CLI leaves Pillow's process-wide limit alone
    api, cli = _reasons(tmp_path / "api"), _reasons(tmp_path / "cli")
    assert set(api) == set(cli) == {"bomb.png"}
    assert api["bomb.png"] == cli["bomb.png"] and "megapixel limit" in api["bomb.png"]
    with pytest.raises(ImageError) as refused:
        open_image(bombed / "bomb.png")
    assert str(refused.value).startswith(str(bombed / "bomb.png")) and api["bomb.png"] in str(
        refused.value
    )


def test_a_limit_pillow_would_lower_is_refused_by_the_api_and_the_cli_alike(bombed, tmp_path):
    above = 2 * pillow_megapixels()
    with pytest.raises(SettingError, match="Pillow's decompression-bomb limit"):
        aimv2_mlx.embed_folder(
            bombed, tmp_path / "api", aimv2_mlx.load("bundled"), max_megapixels=above
        )
    with pytest.raises(SettingError, match="Pillow's decompression-bomb limit"):
        aimv2_mlx.embed([PHOTO], aimv2_mlx.load("bundled"), max_megapixels=above)
    line = one_line_error(
        run_cli(
            "embed", bombed, "-o", tmp_path / "cli", "-m", "bundled", "--max-megapixels", above
        ),
        "--max-megapixels",
        "Pillow's decompression-bomb limit",
    )
    assert "megapixels" in line
    assert not (tmp_path / "cli").exists() and not (tmp_path / "api").exists()


def test_a_lower_limit_is_the_one_every_image_is_held_to(bombed, tmp_path):
    width, height = Image.open(PHOTO).size
    small = width * height / 1e6 / 2
    aimv2_mlx.embed_folder(
        bombed, tmp_path / "api", aimv2_mlx.load("bundled"), max_megapixels=small
    )
    result = run_cli(
        "embed", bombed, "-o", tmp_path / "cli", "-m", "bundled", "--max-megapixels", small
    )
    assert result.exit_code == 1  # nothing embedded
    api, cli = _reasons(tmp_path / "api"), _reasons(tmp_path / "cli")
    assert api == cli and set(api) == {"bomb.png", "chelsea.jpg"}
    assert f"{width}x{height} exceeds the {small:g}-megapixel limit" in api["chelsea.jpg"]
