"""embed(): batching and padding do not change a vector; native models keep each image's shape."""

from __future__ import annotations

from pathlib import Path

import aimv2_mlx

import mlx.core as mx
import numpy as np

from .conftest import tiny_config

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "photos").glob("*.jpg"))


def test_batched_equals_single_image():
    model = aimv2_mlx.load("bundled")
    batched = aimv2_mlx.embed(PHOTOS, model, batch_size=3)  # 4 photos: last batch padded
    assert batched.shape == (len(PHOTOS), model.config.vision.hidden_size)
    for i, photo in enumerate(PHOTOS):
        single = np.array(model.embed(aimv2_mlx.preprocess(photo, model)))[0]
        assert np.abs(single - batched[i]).max() <= 1e-5
    normed = aimv2_mlx.embed(PHOTOS[:2], model, normalize=True)
    assert np.allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)


def test_native_model_embeds_mixed_aspect_ratios():
    mx.random.seed(0)
    model = aimv2_mlx.build(tiny_config(native=True))
    vectors = aimv2_mlx.embed(PHOTOS, model)
    assert vectors.shape == (len(PHOTOS), 64) and np.isfinite(vectors).all()
    shapes = {tuple(p.shape) for p in aimv2_mlx.preprocess(PHOTOS, model)}
    assert len(shapes) > 1  # the photos really differ in shape


def test_embed_names_the_bad_image(tmp_path):
    import pytest

    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(aimv2_mlx.images.ImageError, match=r"bad\.png"):
        aimv2_mlx.embed([PHOTOS[0], tmp_path / "bad.png"], aimv2_mlx.load("bundled"))
