"""The pre-training objective (apple/ml-l3m, configs/aimv2/001_aimv2_hfdata.yaml)
against hand-written NumPy, on a tiny model."""

from __future__ import annotations

from aimv2_mlx import objective
from aimv2_mlx.config import DecoderConfig
from aimv2_mlx.decoder import MultimodalDecoder
from aimv2_mlx.encoder import VisionEncoder
from aimv2_mlx.layers import prefix_mask

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from .conftest import tiny_config

PAD = 0
IGNORE = (PAD, 1)


def _models(seed=0, vocab=23, context=6):
    mx.random.seed(seed)
    vision = tiny_config().vision
    encoder = VisionEncoder(vision)
    encoder.preprocessor.pos_embed = mx.random.normal(encoder.preprocessor.pos_embed.shape) * 0.02
    dcfg = DecoderConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=vocab,
        context_length=context,
    )
    decoder = MultimodalDecoder(dcfg, vision.hidden_size, vision.patch_size**2 * 3)
    decoder.cls = mx.random.normal(decoder.cls.shape)
    decoder.text_pos_embed = mx.random.normal(decoder.text_pos_embed.shape) * 0.1
    return encoder, decoder


def _batch(rng, B=3, size=56, vocab=23, context=6):
    pixels = rng.normal(size=(B, size, size, 3)).astype(np.float32)
    ids = rng.integers(2, vocab, size=(B, context)).astype(np.int32)
    ids[0, 4:] = PAD  # padded caption
    ids[1, 3] = 1  # an EOS in the middle
    prefix = np.array([1, 7, 15], dtype=np.int32)[:B]
    return pixels, ids, prefix


# --- NumPy references -------------------------------------------------------------------------


def np_patchify(pixels, p):
    B, H, W, C = pixels.shape
    gw = W // p
    out = np.zeros((B, (H // p) * gw, p * p * C), np.float32)
    for b in range(B):
        for row in range(H // p):
            for col in range(gw):
                for i in range(p):
                    for j in range(p):
                        for c in range(C):
                            out[b, row * gw + col, (i * p + j) * C + c] = pixels[
                                b, row * p + i, col * p + j, c
                            ]
    return out


def np_normalize(patches):
    x = patches.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-6)


def np_pixel_loss(pred, target, prefix):
    total, count = 0.0, 0
    B, N, _ = target.shape
    for b in range(B):
        for i in range(N - 1):  # output i predicts patch i + 1
            if i + 1 >= prefix[b]:
                total += np.mean((pred[b, i].astype(np.float64) - target[b, i + 1]) ** 2)
                count += 1
    return total / count


def np_text_loss(logits, ids, ignore):
    total, count = 0.0, 0
    B, T = ids.shape
    for b in range(B):
        for j in range(T):  # output j (start vector for j = 0) predicts token j
            if ids[b, j] in ignore:
                continue
            row = logits[b, j].astype(np.float64)
            total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[b, j]]
            count += 1
    return total / count


# --- pieces -----------------------------------------------------------------------------------


def test_prefix_mask_matches_numpy():
    prefix = np.array([1, 5, 15])
    got = np.array(prefix_mask(mx.array(prefix), 16))[:, 0]
    want = np.array([[[k <= q or k < P for k in range(16)] for q in range(16)] for P in prefix])
    np.testing.assert_array_equal(got, want)


def test_prefix_lengths_uniform_on_1_to_n_minus_1():
    got = objective.sample_prefix_lengths(np.random.default_rng(0), 4000, 16)
    assert got.min() == 1 and got.max() == 15
    assert set(np.unique(got)) == set(range(1, 16))


def test_patchify_and_normalisation_match_numpy(rng):
    pixels = rng.normal(size=(2, 28, 42, 3)).astype(np.float32)
    patches = objective.patchify(mx.array(pixels), 14)
    np.testing.assert_array_equal(np.array(patches), np_patchify(pixels, 14))
    np.testing.assert_allclose(np.array(objective.unpatchify(patches, 14, (2, 3))), pixels)
    got = np.array(objective.pixel_targets(mx.array(pixels), 14))
    np.testing.assert_allclose(got, np_normalize(np_patchify(pixels, 14)), rtol=1e-4, atol=1e-5)


def test_pixel_loss_shift_prefix_rule_and_patch_weighted_mean(rng):
    target = rng.normal(size=(3, 16, 12)).astype(np.float32)
    pred = rng.normal(size=(3, 16, 12)).astype(np.float32)
    prefix = np.array([1, 9, 15], dtype=np.int32)
    total = objective.pixel_loss_sum(mx.array(pred), mx.array(target), mx.array(prefix))
    n = objective.pixel_count(prefix, 16)
    assert n == 15 + 7 + 1
    np.testing.assert_allclose(total.item() / n, np_pixel_loss(pred, target, prefix), rtol=1e-5)


def test_text_loss_alignment_and_ignored_ids(rng):
    ids = rng.integers(0, 9, size=(2, 5)).astype(np.int32)
    ids[0, 3:] = PAD
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    total = objective.text_loss_sum(mx.array(logits), mx.array(ids), IGNORE)
    n = objective.text_count(ids, IGNORE)
    np.testing.assert_allclose(total.item() / n, np_text_loss(logits, ids, IGNORE), rtol=1e-5)


# --- the whole objective on a tiny model ------------------------------------------------------


@pytest.mark.parametrize("name", objective.OBJECTIVES)
def test_objective_matches_numpy_on_tiny_model(rng, name):
    encoder, decoder = _models()
    pixels, ids, prefix = _batch(rng)
    weights = objective.LossWeights(0.4, 1.0)
    ps, ts = objective.loss_sums(
        encoder, decoder, mx.array(pixels), mx.array(ids), mx.array(prefix), name, IGNORE
    )
    total, lp, lt = objective.combine(
        ps,
        ts,
        objective.pixel_count(prefix, 16),
        objective.text_count(ids, IGNORE),
        objective.used_weights(name, weights),
    )
    # reference: the models' raw outputs, every loss step in NumPy
    tokens = encoder(
        mx.array(pixels), prefix_lengths=None if name == "caption" else mx.array(prefix)
    )
    pred, logits = decoder(tokens, mx.array(ids))
    want_p = np_pixel_loss(np.array(pred), np_normalize(np_patchify(pixels, 14)), prefix)
    want_t = np_text_loss(np.array(logits), ids, IGNORE)
    want_p, want_t = (
        (want_p, 0.0)
        if name == "image"
        else (0.0, want_t)
        if name == "caption"
        else (want_p, want_t)
    )
    np.testing.assert_allclose(lp.item(), want_p, rtol=1e-4)
    np.testing.assert_allclose(lt.item(), want_t, rtol=1e-4)
    w = {"multimodal": (0.4, 1.0), "image": (0.4, 0.0), "caption": (0.0, 1.0)}[name]
    np.testing.assert_allclose(total.item(), w[0] * want_p + w[1] * want_t, rtol=1e-4)


def test_image_positions_never_see_text_and_text_is_causal(rng):
    _, decoder = _models()
    tokens = mx.array(rng.normal(size=(2, 16, 64)).astype(np.float32))
    ids = rng.integers(2, 23, size=(2, 6)).astype(np.int32)
    pred, logits = decoder(tokens, mx.array(ids))
    pred_alone, _ = decoder(tokens)
    np.testing.assert_allclose(np.array(pred), np.array(pred_alone), atol=1e-5)
    changed = ids.copy()
    changed[:, 3] = (ids[:, 3] + 1) % 23
    _, logits2 = decoder(tokens, mx.array(changed))
    # output j predicts token j from tokens < j: changing token 3 leaves outputs 0..3 alone
    np.testing.assert_allclose(np.array(logits[:, :4]), np.array(logits2[:, :4]), atol=1e-5)
    assert np.abs(np.array(logits[:, 4:]) - np.array(logits2[:, 4:])).max() > 1e-4


class FrozenEncoder(nn.Module):
    """An encoder stand-in whose output ignores its input: only the targets depend on pixels."""

    def __init__(self, tokens, config):
        super().__init__()
        self.tokens = tokens
        self.config = config

    def __call__(self, pixels, prefix_lengths=None):
        return self.tokens


def test_prefix_pixels_do_not_enter_pixel_loss_except_through_encoder(rng):
    encoder, decoder = _models()
    frozen = FrozenEncoder(
        mx.array(rng.normal(size=(3, 16, 64)).astype(np.float32)), encoder.config
    )
    pixels, ids, prefix = _batch(rng)
    prefix = np.array([5, 5, 5], dtype=np.int32)

    def l_pixel(px):
        ps, _ = objective.loss_sums(
            frozen, decoder, mx.array(px), mx.array(ids), mx.array(prefix), "image", IGNORE
        )
        return ps.item()

    base = l_pixel(pixels)
    in_prefix = pixels.copy()
    # patch 2 < P
    in_prefix[:, :14, 28:42] += rng.normal(size=(3, 14, 14, 3)).astype(np.float32) * 3
    assert l_pixel(in_prefix) == pytest.approx(base, rel=1e-6)
    counted = pixels.copy()
    # patch 7 >= P
    counted[:, 14:28, 42:56] += 3.0 * rng.normal(size=(3, 14, 14, 3)).astype(np.float32)
    assert l_pixel(counted) != pytest.approx(base, rel=1e-5)
    # the real encoder does see the prefix pixels
    real = objective.loss_sums(
        encoder, decoder, mx.array(in_prefix), mx.array(ids), mx.array(prefix), "image", IGNORE
    )
    ref = objective.loss_sums(
        encoder, decoder, mx.array(pixels), mx.array(ids), mx.array(prefix), "image", IGNORE
    )
    assert abs(real[0].item() - ref[0].item()) > 1e-6


@pytest.mark.parametrize("name", objective.OBJECTIVES)
def test_gradients_reach_the_encoder(rng, name):
    encoder, decoder = _models()
    pixels, ids, prefix = _batch(rng)
    both = nn.Module()
    both.encoder, both.decoder = encoder, decoder

    def loss(_):
        ps, ts = objective.loss_sums(
            both.encoder,
            both.decoder,
            mx.array(pixels),
            mx.array(ids),
            mx.array(prefix),
            name,
            IGNORE,
        )
        return objective.combine(ps, ts, 10, 10, objective.LossWeights())[0]

    grads = nn.value_and_grad(both, loss)(None)[1]
    flat = dict(tree_flatten(grads["encoder"]))
    for key in (
        "preprocessor.patchifier.proj.weight",
        "trunk.blocks.0.attn.qkv.weight",
        "trunk.blocks.1.mlp.fc2.weight",
        "preprocessor.pos_embed",
    ):
        assert np.abs(np.array(flat[key])).max() > 0, key
    assert all(np.isfinite(np.array(g)).all() for g in flat.values())
