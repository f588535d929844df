"""Parity with transformers' PyTorch AIMv2 on identical random weights at full AIMv2-L size.

The reference models are saved with `save_pretrained` and read back by `aimv2_mlx.load`, so the
weights cross through our own key map and config inference, exactly as a user's download would.
"""

from __future__ import annotations

import gc

import aimv2_mlx

import mlx.core as mx
import numpy as np
import pytest

TOL = 1e-4


def _vision_reference(tmp_path, **overrides):
    import torch
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(0)
    config = Aimv2VisionConfig(use_head=False, **overrides)
    reference = Aimv2VisionModel(config).eval()
    reference.save_pretrained(tmp_path)
    return reference


def _compare_vision(reference, model, pixels: np.ndarray) -> None:
    import torch

    depth = len(model.trunk.blocks)
    with torch.inference_mode():
        expected = reference(
            torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True
        )
    tokens, features = model.forward_features(mx.array(pixels), feature_blocks=tuple(range(depth)))
    assert tokens.shape == tuple(expected.last_hidden_state.shape)
    assert np.abs(np.array(tokens) - expected.last_hidden_state.numpy()).max() <= TOL
    # hidden_states[0] is the embedding output; [i + 1] is block i's output.
    for i, feature in enumerate(features):
        diff = np.abs(np.array(feature) - expected.hidden_states[i + 1].numpy()).max()
        assert diff <= TOL, f"block {i}: max abs diff {diff}"
    pooled = np.array(model.embed(mx.array(pixels)))
    assert np.abs(pooled - expected.last_hidden_state.numpy().mean(axis=1)).max() <= TOL


@pytest.mark.slow
def test_large_224_matches_transformers(tmp_path, transformers_reference, rng):
    reference = _vision_reference(tmp_path)
    model = aimv2_mlx.load(tmp_path)
    assert aimv2_mlx.parameter_count(model) == 309_197_824
    assert model.config.vision.num_hidden_layers == 24
    pixels = rng.standard_normal((2, 224, 224, 3)).astype(np.float32)
    _compare_vision(reference, model, pixels)
    del reference, model
    gc.collect()


@pytest.mark.slow
def test_native_large_non_square_matches_transformers(tmp_path, transformers_reference, rng):
    reference = _vision_reference(tmp_path, is_native=True)
    model = aimv2_mlx.load(tmp_path)
    assert model.config.vision.is_native
    pixels = rng.standard_normal((1, 224, 336, 3)).astype(np.float32)
    _compare_vision(reference, model, pixels)
    del reference, model
    gc.collect()


@pytest.mark.slow
def test_lit_matches_transformers(tmp_path, transformers_reference, rng):
    import torch
    from transformers import Aimv2Config, Aimv2Model

    torch.manual_seed(0)
    config = Aimv2Config(vision_config={"use_head": True}, text_config={}, projection_dim=768)
    # Eager attention: under SDPA, transformers 5.x drops an all-ones attention_mask and its text
    # tower then attends both ways (measured: pooled text differs by ~5 from the causal result).
    reference = Aimv2Model._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # a non-default scale, so a wrong clip/exp would show
        reference.logit_scale.fill_(3.2)
    reference.save_pretrained(tmp_path)
    model = aimv2_mlx.load(tmp_path)
    assert model.config.is_lit
    assert aimv2_mlx.parameter_count(model) == 436_680_193

    pixels = rng.standard_normal((2, 224, 224, 3)).astype(np.float32)
    ids = rng.integers(1, 49406, size=(3, 77))
    ids[:, 0] = 49406
    for row, eos_at in enumerate((5, 20, 76)):
        ids[row, eos_at] = 49407
        ids[row, eos_at + 1 :] = 0
    with torch.inference_mode():
        expected = reference(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),  # makes the text tower causal
        )
    image = np.array(model.encode_image(mx.array(pixels)))
    text = np.array(model.encode_text(mx.array(ids)))
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    per_image, per_text = model.logits(mx.array(pixels), mx.array(ids))
    assert np.abs(image - expected.image_embeds.numpy()).max() <= TOL
    assert np.abs(text - expected.text_embeds.numpy()).max() <= TOL
    assert np.abs(np.array(per_image) - expected.logits_per_image.numpy()).max() <= TOL
    assert np.abs(np.array(per_text) - expected.logits_per_text.numpy()).max() <= TOL


def test_text_tower_is_causal(rng):
    """Changing a token after position j leaves every output at or before j unchanged."""
    from aimv2_mlx.config import TextConfig
    from aimv2_mlx.lit import TextEncoder

    encoder = TextEncoder(
        TextConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            eos_token_id=99,
        )
    )
    ids = rng.integers(0, 99, size=(1, 16))
    changed = ids.copy()
    changed[0, 9:] = (changed[0, 9:] + 1) % 99
    a, _ = encoder.trunk(encoder.preprocessor(mx.array(ids)), "causal")
    b, _ = encoder.trunk(encoder.preprocessor(mx.array(changed)), "causal")
    assert np.abs(np.array(a[:, :9]) - np.array(b[:, :9])).max() == 0
    assert np.abs(np.array(a[:, 9:]) - np.array(b[:, 9:])).max() > 1e-3
