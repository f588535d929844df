"""Hostile data for embed and pretrain: FIFOs named *.png, WebDataset tars read from many threads,
a 65535x1 PNG, a megabyte-long caption token, BOM'd CSVs and non-UTF-8 sidecars."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.images import center_crop, resize_shortest

import numpy as np
import pytest
from PIL import Image

ENV = {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1"}


def _aimv2(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def _png(colour, size=(40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_fifo_named_png_is_never_opened_by_embed(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "good.png").write_bytes(_png((200, 10, 10)))
    os.mkfifo(photos / "pipe.png")
    (tmp_path / "list.txt").write_text("photos/good.png\nphotos/pipe.png\n")
    result = _aimv2("embed", str(photos), "-o", str(tmp_path / "out"), "-m", "bundled", timeout=60)
    assert result.returncode == 0 and "embedded 1 of 1" in result.stdout, result.stderr
    listed = _aimv2(
        "embed",
        str(tmp_path / "list.txt"),
        "-o",
        str(tmp_path / "listed"),
        "-m",
        "bundled",
        timeout=60,
    )
    assert listed.returncode == 0 and "embedded 1 of 2" in listed.stdout, listed.stderr
    assert "skipped photos/pipe.png: cannot read (not a regular file)" in listed.stderr


def test_a_fifo_named_png_is_never_opened_by_pretrain(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_bytes(_png((60 * i, 10, 10)))
        (data / f"{i}.txt").write_text(f"square number {i}")
    os.mkfifo(data / "pipe.png")
    (data / "pipe.txt").write_text("a pipe")
    (tmp_path / "list.csv").write_text(
        "path,caption\n"
        + "".join(f"data/{i}.png,square {i}\n" for i in range(4))
        + "data/pipe.png,a pipe\n"
    )
    tiny = [
        "--width",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
        "--image-size",
        "28",
        "--decoder-depth",
        "1",
        "-b",
        "5",
        "--no-compile",
        "--context-length",
        "8",
        "--vocab-size",
        "60",
        "--steps",
        "1",
    ]
    for source, run in ((data, "run"), (tmp_path / "list.csv", "listed")):
        result = _aimv2("pretrain", str(source), "-o", str(tmp_path / run), *tiny, timeout=120)
        assert result.returncode == 0, result.stderr
    assert "pipe.png" in (tmp_path / "listed" / "failures.jsonl").read_text()


def _webdataset(folder: Path, shards: int = 2, per_shard: int = 24) -> dict[str, np.ndarray]:
    """Real img2dataset-style tars (KEY.jpg, KEY.txt, KEY.json) of distinct images; their pixels
    by caption.
    """
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    expected = {}
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = photos[i % 4][i : i + 96, i : i + 128]
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, "PNG")
                caption = f"sample {key}"
                expected[caption] = image
                for name, blob in (
                    (f"{key}.png", buffer.getvalue()),
                    (f"{key}.txt", caption.encode()),
                    (f"{key}.json", b"{}"),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return expected


def test_webdataset_samples_read_from_eight_threads_are_each_their_own_image(tmp_path):
    expected = _webdataset(tmp_path)
    for run in range(3):
        source = load_captioned(tmp_path)
        order = np.random.default_rng(run).permutation(np.tile(np.arange(len(source)), 4))
        with ThreadPoolExecutor(8) as pool:
            for image, caption in pool.map(source.__getitem__, order):
                assert np.array_equal(np.asarray(image), expected[caption]), caption


def test_pretrain_on_webdataset_tars_runs_in_every_trial(tmp_path):
    from aimv2_mlx.tokenizer import train_tokenizer
    from aimv2_mlx.train.batches import BatchPlan

    from .test_pretrain import tiny_run

    _webdataset(tmp_path, per_shard=16)
    source = load_captioned(tmp_path)
    tok = train_tokenizer(source.captions(), 64, 10)
    for trial in range(4):
        config = tiny_run(tok, batch_size=8, seed=trial)
        threaded, serial = (
            BatchPlan(source, tok, config, workers=4),
            BatchPlan(source, tok, config, workers=1),
        )
        for step in range(4):
            assert np.array_equal(
                threaded.step(step).micro[0].pixels, serial.step(step).micro[0].pixels
            )


def test_a_65535x1_png_resizes_only_what_the_crop_keeps_under_a_one_gib_address_space_limit(
    tmp_path,
):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (65535, 1), (200, 30, 40)).save(strip)
    code = textwrap.dedent("""
        import resource, sys
        from aimv2_mlx.config import PreprocessConfig
        from aimv2_mlx.images import ImageError, open_image, to_pixels
        status = open("/proc/self/status").read()
        used = int(status.split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, used + 2**30))
        for mode in ("clip", "ml-aim"):
            pixels = to_pixels(open_image(sys.argv[1]), PreprocessConfig.for_mode(mode, 224), 14)
            print(mode, pixels.shape)
        try:
            to_pixels(open_image(sys.argv[1]), PreprocessConfig.for_mode("native", 224), 14)
        except ImageError as exc:
            print("native refused:", exc)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code, str(strip)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        result.stdout.count("(224, 224, 3)") == 2
        and "native refused: 65535x1 is too elongated" in result.stdout
    )


@pytest.mark.parametrize("size", [(2400, 60), (50, 1900)])
def test_a_long_strip_crops_as_resizing_the_whole_strip_would(size):
    from aimv2_mlx.images import resize_then_crop

    from skimage import data

    image = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.BILINEAR)
    for shortest, crop, rounding in ((224, 224, "floor"), (256, 224, "round")):
        whole = np.asarray(center_crop(resize_shortest(image, shortest), crop, rounding)).astype(
            int
        )
        boxed = np.asarray(resize_then_crop(image, shortest, crop, rounding)).astype(int)
        assert boxed.shape == whole.shape and np.abs(boxed - whole).max() <= 8
        assert np.abs(boxed - whole).mean() < 0.5


def test_a_megabyte_token_in_a_caption_is_cut_before_tokenizer_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(_png((10, 60 * i, 10)))
        (data / f"{i}.txt").write_text("a small red square" if i else "x" + "ab" * 500_000)
    result = _aimv2(
        "tokenizer",
        "train",
        str(data),
        "-o",
        str(tmp_path / "tok.json"),
        "--vocab-size",
        "80",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "cut 1 captions to 1000 characters" in result.stdout


def test_a_bom_csv_and_a_latin1_sidecar_load_without_a_traceback(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "list.csv").write_bytes("path,caption\na.png,un café\n".encode("utf-8-sig"))
    assert load_captioned(tmp_path / "list.csv")[0][1] == "un café"
    (tmp_path / "list.jsonl").write_bytes('{"path": "a.png", "caption": "x"}\n'.encode("utf-8-sig"))
    assert load_captioned(tmp_path / "list.jsonl")[0][1] == "x"
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png((1, 2, 3)))
    (folder / "a.txt").write_bytes("un caf\xe9".encode("latin-1"))
    assert load_captioned(folder)[0][1] == "un caf\ufffd"
