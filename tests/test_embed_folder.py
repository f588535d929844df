"""embed_folder on a hostile folder: every good image once and exact, every bad one listed;
resume.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.embed import embed_folder

import numpy as np
import pytest
from PIL import Image

from .conftest import png_bomb, tiny_config

BAD = {"truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png", "bad\\xff.jpg"}


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    from skimage import data

    base = tmp_path_factory.mktemp("messy")
    root = base / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(root / "astronaut.jpg", quality=90)
    Image.fromarray(data.coffee()).save(root / "nested" / "deeper" / "coffee.png")
    chelsea = Image.fromarray(data.chelsea())
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright is 300 wide, 451 high
    chelsea.save(root / "rotated.jpg", exif=exif.tobytes())
    rgba = Image.fromarray(data.rocket()).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    Image.fromarray(data.astronaut()).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "palette.gif"
    )
    Image.fromarray(data.coffee()).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(root / "gray16.png")
    Image.fromarray(data.chelsea()).save(root / "nested" / "cat.webp")
    Image.fromarray(data.rocket()).save(root / "nested" / "rocket.bmp")
    Image.fromarray(data.coffee()).save(root / "nested" / "coffee.tiff")
    os.close(os.open(os.fsencode(root) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    Image.fromarray(data.chelsea()).save(os.fsencode(root) + b"/caf\xe9.png")
    whole = io.BytesIO()
    Image.fromarray(data.astronaut()).save(whole, "JPEG")
    (root / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image\n")
    with open(os.fsencode(root) + b"/bad\xff.jpg", "wb") as fh:  # a bad file with a non-UTF-8 name
        fh.write(b"\xff\xd8 not a JPEG")
    png_bomb(root / "bomb.png")
    (root / ".hidden.jpg").write_bytes(b"hidden files are skipped")
    (root / "._astronaut.jpg").write_bytes(b"AppleDouble resource fork")
    (root / "README.txt").write_text("not an image suffix: skipped")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(data.rocket()).save(elsewhere / "rocket.jpg")
    os.symlink(elsewhere, root / "linked")
    os.symlink(root, root / "nested" / "loop")  # a cycle: must not be walked twice
    return root


def _good_keys(root: Path) -> list[str]:
    return sorted(
        [
            "astronaut.jpg",
            "nested/deeper/coffee.png",
            "rotated.jpg",
            "rgba.png",
            "palette.gif",
            "cmyk.jpg",
            "gray16.png",
            "nested/cat.webp",
            "nested/rocket.bmp",
            "nested/coffee.tiff",
            "caf\\xe9.png",
            "linked/rocket.jpg",
        ],
        key=lambda k: k.encode("utf-8", "surrogateescape"),
    )


def test_messy_folder_every_good_image_once_every_bad_one_listed(messy, tmp_path):
    model = aimv2_mlx.load("bundled")
    summary = embed_folder(messy, tmp_path / "out", model, batch_size=4, shard_size=5)
    vectors, metadata = aimv2_mlx.read_embeddings(tmp_path / "out")
    keys = metadata.column("path").to_pylist()
    assert keys == _good_keys(messy)
    failures = [
        json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()
    ]
    assert {f["path"] for f in failures} == BAD and all(f["reason"] for f in failures)
    reasons = {f["path"]: f["reason"] for f in failures}
    assert "megapixel" in reasons["bomb.png"]
    assert (summary.embedded, summary.failed, summary.images) == (
        len(keys),
        len(BAD),
        len(keys) + len(BAD),
    )
    assert summary.shards == 4  # 16 inputs in shards of 5
    row = keys.index("rotated.jpg")
    assert (metadata.column("width")[row].as_py(), metadata.column("height")[row].as_py()) == (
        300,
        451,
    )
    for key, vector in zip(keys, vectors, strict=True):
        path = os.fsdecode(
            os.fsencode(messy)
            + b"/"
            + key.replace("\\xe9", "\udce9").encode("utf-8", "surrogateescape")
        )
        single = np.array(model.embed(aimv2_mlx.preprocess(path, model)))[0]
        assert np.abs(single - vector).max() <= 1e-5, key


def test_formats_pools_and_dtypes_read_back_alike(messy, tmp_path):
    mlx_model = aimv2_mlx.build(tiny_config(head=True))
    reference = None
    for fmt in ("npy", "safetensors", "parquet"):
        embed_folder(
            messy, tmp_path / fmt, mlx_model, pool="head", normalize=True, format=fmt, shard_size=7
        )
        vectors, metadata = aimv2_mlx.read_embeddings(tmp_path / fmt)
        assert vectors.shape == (12, 64) and np.allclose(
            np.linalg.norm(vectors, axis=1), 1, atol=1e-5
        )
        if reference is None:
            reference = vectors
        assert np.array_equal(vectors, reference) and "embedding" not in metadata.column_names
    embed_folder(
        messy, tmp_path / "tokens", mlx_model, pool="tokens", dtype="float16", format="parquet"
    )
    tokens, _ = aimv2_mlx.read_embeddings(tmp_path / "tokens")
    assert tokens.shape == (12, 16, 64) and tokens.dtype == np.float16


def test_resume_skips_finished_shards_and_refuses_other_settings(messy, tmp_path):
    model = aimv2_mlx.load("bundled")
    out = tmp_path / "out"
    embed_folder(messy, out, model, shard_size=5)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / "shard-00002.done.json").unlink()  # as if the run had died while writing shard 2
    (out / ".shard-00002.npy.tmp-99999").write_bytes(b"half a file")
    again = embed_folder(messy, out, model, shard_size=5)
    assert again.shards_reused == 3 and again.processed == 5
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert all(now[name] == first[name] for name in first if not name.startswith("shard-00002"))
    assert now["shard-00002.npy"] != first["shard-00002.npy"]
    assert not list(out.glob(".*"))  # the killed run's temporary file is gone
    with pytest.raises(FileExistsError, match="pool"):
        embed_folder(messy, out, model, shard_size=5, pool="tokens")
    with pytest.raises(FileExistsError, match="model"):
        embed_folder(messy, out, aimv2_mlx.build(tiny_config()), shard_size=5)
    replaced = embed_folder(messy, out, model, shard_size=5, pool="tokens", overwrite=True)
    assert (
        replaced.shards_reused == 0
        and json.loads((out / "manifest.json").read_text())["pool"] == "tokens"
    )


def test_heic_decodes_when_pillow_heif_is_installed(tmp_path):
    pytest.importorskip("pillow_heif", reason="HEIC needs the heif extra (pillow-heif)")
    from skimage import data

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.heic")
    model = aimv2_mlx.load("bundled")
    summary = embed_folder(tmp_path, tmp_path / "out", model)
    _vectors, metadata = aimv2_mlx.read_embeddings(tmp_path / "out")
    assert summary.failed == 0 and metadata.column("path").to_pylist() == ["cat.heic"]
    assert (metadata.column("width")[0].as_py(), metadata.column("height")[0].as_py()) == (451, 300)


def test_webdataset_tar_members_embed_like_the_files(tmp_path):
    import tarfile

    from skimage import data

    folder = tmp_path / "files"
    folder.mkdir()
    Image.fromarray(data.chelsea()).save(folder / "000000.jpg")
    Image.fromarray(data.rocket()).save(folder / "000001.png")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name in ("000000.jpg", "000001.png"):
            tar.add(folder / name, arcname=name)
            info = tarfile.TarInfo(name.split(".")[0] + ".json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    model = aimv2_mlx.load("bundled")
    embed_folder(folder, tmp_path / "from-files", model)
    embed_folder(tmp_path / "00000.tar", tmp_path / "from-tar", model)
    files, _ = aimv2_mlx.read_embeddings(tmp_path / "from-files")
    tarred, metadata = aimv2_mlx.read_embeddings(tmp_path / "from-tar")
    assert metadata.column("path").to_pylist() == ["000000.jpg", "000001.png"]
    assert np.array_equal(files, tarred)
