"""Pre-training data: the shapes generator, captioned sources, augmentation, tokenizer, batches."""

from __future__ import annotations

import io
import json
import tarfile

from aimv2_mlx.config import DecoderConfig, EncoderConfig
from aimv2_mlx.data import shapes
from aimv2_mlx.data.augment import augment, normalize, random_resized_crop_box
from aimv2_mlx.data.captioned import CaptionDataError, load_captioned
from aimv2_mlx.tokenizer import load_tokenizer, train_tokenizer
from aimv2_mlx.train.batches import BatchPlan
from aimv2_mlx.train.config import PretrainConfig

import numpy as np
import pytest
from PIL import Image


def test_shapes_are_deterministic_and_captions_name_the_labels():
    for i in range(20):
        image, caption, labels = shapes.make_sample(3, i, 56)
        again, caption2, _ = shapes.make_sample(3, i, 56)
        assert np.array_equal(np.asarray(image), np.asarray(again)) and caption == caption2
        assert (
            caption.startswith("a ")
            and f"{labels['color']} {labels['shape']}"
            in caption.split(" above ")[0]
            .split(" below ")[0]
            .split(" left of ")[0]
            .split(" right of ")[0]
        )
        assert caption.count(" a ") + 1 == int(labels["count"])
    assert not np.array_equal(
        np.asarray(shapes.make_sample(3, 0)[0]), np.asarray(shapes.make_sample(4, 0)[0])
    )


def test_shape_position_label_is_where_the_colour_is():
    hits = 0
    for i in range(30):
        image, _, labels = shapes.make_sample(0, i, 64)
        if labels["count"] != "1":
            continue
        pixels = np.asarray(image).astype(int)
        colour = np.array(shapes.COLORS[labels["color"]])
        ys, xs = np.nonzero(np.abs(pixels - colour).sum(-1) == 0)
        quadrant = shapes.POSITIONS[2 * (ys.mean() >= 32) + (xs.mean() >= 32)]
        hits += quadrant == labels["position"]
        assert quadrant == labels["position"]
    assert hits > 0


def test_write_shapes_files_and_labels(tmp_path):
    out = shapes.write_shapes(tmp_path / "s", 5, size=28, seed=1)
    paths, labels = shapes.read_labels(out)
    assert len(paths) == 5 and set(labels) == set(shapes.ATTRIBUTES)
    assert (out / paths[0]).with_suffix(".txt").read_text().strip() == shapes.make_sample(1, 0, 28)[
        1
    ]
    with pytest.raises(FileExistsError):
        shapes.write_shapes(out, 1)


def _png(colour=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_captioned_sources(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(_png())
    (tmp_path / "f" / "a.txt").write_text("  A red\nsquare ")
    (tmp_path / "f" / "b.png").write_bytes(_png())  # no sidecar: not a pair
    folder = load_captioned(tmp_path / "f")
    assert len(folder) == 1 and folder[0][1] == "A red square" and folder[0][0].size == (20, 16)

    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "f/a.png", "caption": "x"}) + "\n")
    assert load_captioned(tmp_path / "list.jsonl")[0][1] == "x"
    (tmp_path / "list.csv").write_text('path,caption\nf/b.png,"y, z"\n')
    assert load_captioned(tmp_path / "list.csv")[0][1] == "y, z"

    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, text in (("000000000", "first"), ("000000001", "second")):
            for name, data in (
                (f"{key}.jpg", _png()),
                (f"{key}.txt", text.encode()),
                (f"{key}.json", b"{}"),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shards = load_captioned(tmp_path / "00000.tar")
    assert [shards[i][1] for i in range(2)] == ["first", "second"]


def test_a_pretraining_tar_takes_every_image_type_a_folder_takes(tmp_path):
    formats = {
        ".png": "PNG",
        ".jpg": "JPEG",
        ".bmp": "BMP",
        ".webp": "WEBP",
        ".gif": "GIF",
        ".tif": "TIFF",
        ".tiff": "TIFF",
    }
    (tmp_path / "folder").mkdir()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, (suffix, fmt) in enumerate(formats.items()):
            buffer = io.BytesIO()
            Image.new("RGB", (20, 16), (30 * i, 90, 200)).save(buffer, fmt)
            files = {
                f"{i:04d}{suffix}": buffer.getvalue(),
                f"{i:04d}.txt": f"a {fmt} file".encode(),
            }
            for name, data in files.items():
                (tmp_path / "folder" / name).write_bytes(data)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    folder, shard = load_captioned(tmp_path / "folder"), load_captioned(tmp_path / "00000.tar")
    assert len(folder) == len(formats)
    assert [s.name.split(":")[-1] for s in shard.samples] == [s.name for s in folder.samples]
    for i in range(len(formats)):
        (from_folder, caption), (from_tar, same) = folder[i], shard[i]
        assert caption == same and np.array_equal(np.asarray(from_folder), np.asarray(from_tar))


def test_captioned_bad_input_names_the_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"path": "a.png"}\n')
    with pytest.raises(CaptionDataError, match=r"bad.jsonl:1: needs 'path' and 'caption'"):
        load_captioned(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{nope\n")
    with pytest.raises(CaptionDataError, match=r"broken\.jsonl:1: not JSON"):
        load_captioned(tmp_path / "broken.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionDataError, match="no image \\+ caption pairs"):
        load_captioned(tmp_path / "empty")
    with pytest.raises(CaptionDataError, match="no such folder"):
        load_captioned(tmp_path / "missing")


def test_random_resized_crop_in_bounds_and_scale_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(rng, 120, 90)
        assert left >= 0 and left + w <= 120 and top >= 0 and top + h <= 90
        assert 0.4 * 120 * 90 * 0.95 <= w * h <= 120 * 90 * 1.0
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    a = augment(image, 28, np.random.default_rng(5))
    b = augment(image, 28, np.random.default_rng(5))
    assert a.size == (28, 28) and np.array_equal(np.asarray(a), np.asarray(b))
    pixels = normalize(Image.new("RGB", (2, 2), (255, 0, 128)))
    np.testing.assert_allclose(
        pixels[0, 0],
        (np.array([1.0, 0.0, 128 / 255]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
        rtol=1e-6,
    )


def test_tokenizer_pads_with_ignored_eos_truncates_and_round_trips(tmp_path):
    tok = train_tokenizer(
        ["a small red circle", "a large blue square above a small red circle"] * 5, 60, 6
    )
    ids = tok.encode(["A small, RED circle!", "a large blue square above a small red circle"])
    assert ids.shape == (2, 6) and ids.dtype == np.int32
    assert tok.decode(ids[0]) == "a small red circle"
    assert (ids[0] == tok.eos_id).sum() >= 1 and tok.ignore_ids == (tok.eos_id,)
    # cut to 5 tokens + EOS, as ml-l3m
    assert ids[1, -1] == tok.eos_id and tok.eos_id not in ids[1, :-1]
    loaded = load_tokenizer(tok.save(tmp_path / "tokenizer.json"), 6)
    np.testing.assert_array_equal(loaded.encode(["a small red circle"]), ids[:1])
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.json")


def test_two_ranks_see_what_one_process_sees(tmp_path):
    source = load_captioned(shapes.write_shapes(tmp_path / "d", 10, size=28))
    tok = train_tokenizer(source.captions(), 40, 8)
    cfg = PretrainConfig(
        encoder=EncoderConfig(32, 1, 2, 64, image_size=28),
        decoder=DecoderConfig(32, 1, 2, 64, 40, 8),
        batch_size=6,
    )
    one = BatchPlan(source, tok, cfg).step(2)  # positions 12..17: crosses into epoch 1
    halves = [
        BatchPlan(source, tok, PretrainConfig(**{**cfg.__dict__, "batch_size": 3}), r, 2).step(2)
        for r in (0, 1)
    ]
    for field in ("pixels", "input_ids", "prefix_lengths", "indices"):
        joined = np.concatenate([getattr(h.micro[0], field) for h in halves])
        np.testing.assert_array_equal(joined, getattr(one.micro[0], field))
    assert halves[0].pixel_count + halves[1].pixel_count == one.pixel_count
    assert halves[0].text_count + halves[1].text_count == one.text_count
