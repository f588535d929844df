"""Every model answers `config`, `location`, `kind` and `image_features(pixels, pool)` itself: a
`VisionEncoder` built straight from an `EncoderConfig` embeds, and LiT's pools are its towers'."""

from __future__ import annotations

import ast
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.base import Model
from aimv2_mlx.config import EncoderConfig, ModelConfig, PreprocessConfig, TextConfig

import mlx.core as mx
import numpy as np
import pytest

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "examples" / "photos").glob("*.jpg"))[:2]
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=56
)


def _attention_pool(tokens: np.ndarray, head, heads: int) -> np.ndarray:
    """ml-aim's AttentionPoolingClassifier (apple/ml-aim aim/v2/torch/layers.py) in NumPy."""
    B, N, D = tokens.shape
    d = D // heads
    q = np.broadcast_to(np.array(head.cls_token), (B, 1, D)).reshape(B, 1, heads, d)
    q = q.transpose(0, 2, 1, 3)
    k = (tokens @ np.array(head.k.weight).T).reshape(B, N, heads, d).transpose(0, 2, 1, 3)
    v = (tokens @ np.array(head.v.weight).T).reshape(B, N, heads, d).transpose(0, 2, 1, 3)
    scores = q @ k.transpose(0, 1, 3, 2) * d**-0.5
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    pooled = (weights @ v).transpose(0, 2, 1, 3).reshape(B, 1, D).mean(axis=1)
    return pooled @ np.array(head.linear.weight).T + np.array(head.linear.bias)


def test_a_directly_built_encoder_embeds_with_the_released_preprocessing():
    mx.random.seed(0)
    model = aimv2_mlx.VisionEncoder(EncoderConfig(**TINY))
    assert isinstance(model, Model) and model.kind == "vision encoder" and model.location is None
    assert model.config.vision == EncoderConfig(**TINY)
    assert model.config.preprocess == PreprocessConfig.for_mode("clip", 56)
    vectors = aimv2_mlx.embed(PHOTOS, model, batch_size=2)
    pixels = aimv2_mlx.preprocess(PHOTOS, config=PreprocessConfig.for_mode("clip", 56))
    expected = np.array(model(pixels)).mean(axis=1)
    assert vectors.shape == (len(PHOTOS), 64)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_a_directly_built_native_encoder_gets_native_preprocessing():
    model = aimv2_mlx.VisionEncoder(EncoderConfig(**TINY, is_native=True))
    assert model.config.preprocess == PreprocessConfig.for_mode("native", 56)
    assert aimv2_mlx.embed(PHOTOS[:1], model).shape == (1, 64)


def test_head_pooling_is_the_attention_pool_head_and_blocks_average_raw_block_outputs(rng):
    mx.random.seed(1)
    model = aimv2_mlx.VisionEncoder(EncoderConfig(**TINY, use_head=True))
    pixels = mx.array(rng.standard_normal((2, 56, 56, 3)).astype(np.float32))
    tokens = np.array(model(pixels))
    np.testing.assert_allclose(
        np.array(model.image_features(pixels, "head")),
        _attention_pool(tokens, model.head, 2),
        atol=1e-5,
    )
    np.testing.assert_allclose(np.array(model.image_features(pixels, "tokens")), tokens, atol=0)
    _, outputs = model.forward_features(pixels, feature_blocks=(0, 1))
    blocks = np.mean([np.array(o) for o in outputs], axis=0)
    np.testing.assert_allclose(
        np.array(model.image_features(pixels, "mean", blocks=(0, -1))),
        blocks.mean(axis=1),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        model.image_features(pixels, "max")
    with pytest.raises(ValueError, match="no attention-pooling head"):
        aimv2_mlx.VisionEncoder(EncoderConfig(**TINY)).image_features(pixels, "head")


def test_a_lit_model_pools_through_its_image_tower_and_projects_its_head(rng):
    mx.random.seed(2)
    text = TextConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=8,
        eos_token_id=63,
    )
    config = ModelConfig(
        name="tiny-lit",
        vision=EncoderConfig(**TINY, use_head=True),
        text=text,
        projection_dim=16,
        preprocess=PreprocessConfig.for_mode("clip", 56),
    )
    model = aimv2_mlx.build(config)
    assert model.kind == "LiT (image + text)" and model.config is config and model.location is None
    pixels = mx.array(rng.standard_normal((2, 56, 56, 3)).astype(np.float32))
    tokens = np.array(model.image_encoder(pixels))
    mean = np.array(model.image_features(pixels))
    np.testing.assert_allclose(mean, tokens.mean(axis=1), atol=1e-5)
    pooled = _attention_pool(tokens, model.image_encoder.head, 2)
    projected = pooled @ np.array(model.image_projector.weight).T
    np.testing.assert_allclose(np.array(model.image_features(pixels, "head")), projected, atol=1e-5)


def test_a_loaded_model_knows_where_it_came_from_and_a_built_one_does_not(tmp_path):
    built = aimv2_mlx.build(tiny_config())
    assert built.location is None and built.kind == "vision encoder"
    loaded = aimv2_mlx.load(aimv2_mlx.save(built, tmp_path / "tiny"))
    assert loaded.location.path == tmp_path / "tiny"
    assert loaded.location.origin == str((tmp_path / "tiny").resolve())
    assert loaded.config == built.config


PATCHED = {"config", "location", "model_config"}
KIND_ATTRIBUTES = {"encode_image", "image_encoder", "location", "model_config", "pool"}


def _outside_patches_and_kind_tests(folder: Path) -> list[str]:
    """`x.config = …`, `x.location = …` outside `self`; hasattr tests of a model's kind."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        where = path.relative_to(folder.parent)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in node.targets if isinstance(node, ast.Assign) else []:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr in PATCHED
                    and not (isinstance(target.value, ast.Name) and target.value.id == "self")
                ):
                    found.append(f"{where}:{node.lineno}: sets .{target.attr}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in KIND_ATTRIBUTES
            ):
                found.append(f"{where}:{node.lineno}: {node.func.id}({node.args[1].value!r})")
    return found


def test_no_code_patches_model_metadata_from_outside_or_tests_a_models_kind_by_its_attributes():
    for folder in ("aimv2_mlx", "cli", "convert"):
        assert _outside_patches_and_kind_tests(ROOT / folder) == []


def test_the_patch_scan_sees_an_outside_patch_and_an_attribute_dispatch(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "sample.py").write_text(
        "encoder.model_config = config\n"
        "self.config = config\n"
        "where = getattr(model, 'location', None)\n"
        "out = model.encode_image(p) if hasattr(model, 'encode_image') else model.pool(p)\n"
    )
    assert _outside_patches_and_kind_tests(tmp_path / "code") == [
        "code/sample.py:1: sets .model_config",
        "code/sample.py:3: getattr('location')",
        "code/sample.py:4: hasattr('encode_image')",
    ]
