"""What `aimv2 embed` owns in its output folder: it deletes only the files its manifest lists,
refuses folders that are not its own, and locks the folder while it writes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.embed import embed_folder
from aimv2_mlx.folders import LOCK, locked

import pytest
from PIL import Image

ENV = {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model():
    return aimv2_mlx.load("bundled")


def _photos(folder: Path, count: int = 3) -> Path:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate([data.astronaut(), data.chelsea(), data.coffee()][:count]):
        Image.fromarray(image).save(folder / f"{i:03d}.jpg", quality=85)
    return folder


def _webdataset(path: Path, photos: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for image in sorted(photos.glob("*.jpg")):
            tar.add(image, arcname=image.name)
            info = tarfile.TarInfo(image.stem + ".txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"a cat"))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _embed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", "embed", *args, "-m", "bundled"],
        capture_output=True,
        text=True,
        env=ENV,
    )


def test_overwrite_deletes_only_listed_files_never_a_webdataset_input_or_a_foreign_file(
    model, tmp_path
):
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    embed_folder(photos, out, model, shard_size=2)
    tar = _webdataset(out / "shard-00000.tar", photos)
    (out / "shard-notes.txt").write_text("mine")
    keep = {name: (out / name).read_bytes() for name in ("shard-00000.tar", "shard-notes.txt")}

    summary = embed_folder(tar, out, model, shard_size=2, pool="tokens", overwrite=True)

    assert summary.embedded == 3 and summary.failed == 0
    assert {name: (out / name).read_bytes() for name in keep} == keep
    _, metadata = aimv2_mlx.read_embeddings(out)
    assert metadata.column("path").to_pylist() == ["000.jpg", "001.jpg", "002.jpg"]


def test_a_tampered_manifest_cannot_make_overwrite_delete_other_files(model, tmp_path):
    import json

    photos = _photos(tmp_path / "photos", 1)
    out = tmp_path / "out"
    embed_folder(photos, out, model)
    (out / "notes.txt").write_text("mine")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] += ["notes.txt", "../photos/000.jpg"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    embed_folder(photos, out, model, pool="tokens", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (photos / "000.jpg").is_file()


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_embed_into_a_photo_folder_is_refused_in_one_line_and_writes_nothing(tmp_path, extra):
    photos = _photos(tmp_path / "photos")
    (photos / "shard-00000.npy").write_bytes(b"a user's file")
    before = _snapshot(photos)
    result = _embed(str(photos), "-o", str(photos), *extra)
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.strip().count("\n") == 0
        and "not an aimv2 embed output folder" in result.stderr
    )
    assert str(photos) in result.stderr and "--overwrite" not in result.stderr
    assert _snapshot(photos) == before


def test_a_second_embed_on_a_locked_folder_says_which_pid_holds_it(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    out = tmp_path / "out"
    with locked(out):
        result = _embed(str(photos), "-o", str(out))
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert f"in use by PID {os.getpid()}" in result.stderr
    assert not (out / "manifest.json").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_removed(model, tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("999999999\n")  # a killed run's lock file: no process holds its flock
    summary = embed_folder(photos, out, model)
    assert summary.embedded == 1 and not (out / LOCK).exists()
