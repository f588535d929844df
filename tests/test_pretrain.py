"""Training: optimizer settings vs NumPy, exact resume, exact accumulation, compiled == eager,
export.
"""

from __future__ import annotations

import dataclasses
import json
import math

import aimv2_mlx
from aimv2_mlx.config import DecoderConfig, EncoderConfig
from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.objective import pixel_count, text_count
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.batches import MicroBatch, StepBatch
from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.export import export_encoder
from aimv2_mlx.train.loop import build_pretrain_model, pretrain
from aimv2_mlx.train.optimizer import build_optimizer, decays, schedule

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    source = load_captioned(write_shapes(root / "data", 24, size=28))
    return source, train_tokenizer(source.captions(), 64, 10)


def tiny_run(tokenizer, **overrides) -> PretrainConfig:
    values = dict(
        encoder=EncoderConfig(32, 2, 2, 64, image_size=28),
        decoder=DecoderConfig(32, 1, 2, 64, tokenizer.vocab_size, 10),
        batch_size=4,
        steps=20,
        log_every=1,
        checkpoint_every=1000,
        compile=False,
    )
    values.update(overrides)
    # a warmup longer than the run is refused
    values.setdefault("warmup_steps", min(3, values["steps"]))
    return PretrainConfig(**values)


def weights_of(run):
    folder = sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
    encoder = mx.load(str(folder / "encoder" / "model.safetensors"))
    decoder = mx.load(str(folder / "decoder.safetensors"))
    return {
        **{f"encoder.{k}": v for k, v in encoder.items()},
        **{f"decoder.{k}": v for k, v in decoder.items()},
    }


def assert_same_weights(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(
            np.array(a[key]), np.array(b[key]), rtol=rtol, atol=atol, err_msg=key
        )


# --- optimizer --------------------------------------------------------------------------------


def test_weight_decay_exclusions(shapes):
    _, tok = shapes
    model = build_pretrain_model(tiny_run(tok))
    flat = dict(tree_flatten(model.parameters()))
    excluded = {k for k, v in flat.items() if not decays(k, v)}
    assert excluded == {
        k
        for k in flat
        if k.endswith("bias")
        or "norm" in k
        or k.split(".")[-1] in ("pos_embed", "text_pos_embed", "cls")
    }
    assert (
        "decoder.text_embedding.weight" not in excluded
        and "encoder.trunk.blocks.0.attn.qkv.weight" not in excluded
    )


def test_schedule_warmup_then_cosine():
    cfg = PretrainConfig(steps=100, warmup_steps=10, peak_lr=1e-3, start_lr=1e-6, end_lr=1e-5)
    lr = schedule(cfg)
    for t in (0, 5, 10, 40, 99):
        if t < 10:
            want = 1e-6 + (1e-3 - 1e-6) * t / 10
        else:
            want = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (t - 10) / 90))
        assert lr(mx.array(t)).item() == pytest.approx(want, rel=1e-5)


def test_adamw_step_matches_pytorch_semantics_in_numpy(rng):
    """Bias-corrected Adam, p ← p(1 − lr·wd) − lr·m̂/(√v̂ + eps), decay only where `decays` says."""
    cfg = PretrainConfig(steps=10, warmup_steps=0, peak_lr=1e-2, end_lr=1e-2, weight_decay=0.1)
    model = nn.Module()
    model.linear = nn.Linear(3, 2)
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    opt = build_optimizer(cfg)
    m = {k: 0.0 for k in params}
    v = {k: 0.0 for k in params}
    for t in range(1, 4):
        grads = {k: rng.normal(size=p.shape).astype(np.float32) for k, p in params.items()}
        opt.update(model, {"linear": {k.split(".")[1]: mx.array(g) for k, g in grads.items()}})
        for k, g in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.95 * v[k] + 0.05 * g * g
            wd = 0.1 if k.endswith("weight") else 0.0
            params[k] = params[k] * (1 - 1e-2 * wd) - 1e-2 * (m[k] / (1 - 0.9**t)) / (
                np.sqrt(v[k] / (1 - 0.95**t)) + 1e-8
            )
    for k, value in tree_flatten(model.parameters()):
        np.testing.assert_allclose(np.array(value), params[k], rtol=1e-5, atol=1e-7)


# --- the loop ---------------------------------------------------------------------------------


def test_resume_continues_exactly(shapes, tmp_path):
    source, tok = shapes
    cfg = tiny_run(tok)
    straight = pretrain(source, tmp_path / "a", cfg, tok, echo=lambda *_: None)
    pretrain(source, tmp_path / "b", cfg, tok, until=10, echo=lambda *_: None)
    resumed = pretrain(source, tmp_path / "b", resume=True, echo=lambda *_: None)
    assert straight["step"] == resumed["step"] == 20
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    assert_same_weights(weights_of(tmp_path / "a"), weights_of(tmp_path / "b"))
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"loss", "loss_pixel", "loss_text", "lr", "grad_norm", "img_per_s"} <= records[0].keys()


def test_accumulation_equals_the_larger_batch(shapes, tmp_path):
    source, tok = shapes
    big = pretrain(
        source, tmp_path / "a", tiny_run(tok, batch_size=8, steps=3), tok, echo=lambda *_: None
    )
    acc = pretrain(
        source,
        tmp_path / "b",
        tiny_run(tok, batch_size=4, accumulation=2, steps=3),
        tok,
        echo=lambda *_: None,
    )
    assert acc["loss"] == pytest.approx(big["loss"], rel=1e-5)
    assert_same_weights(
        weights_of(tmp_path / "a"), weights_of(tmp_path / "b"), rtol=1e-4, atol=1e-6
    )


def test_compiled_step_equals_eager(shapes, tmp_path):
    source, tok = shapes
    eager = pretrain(source, tmp_path / "a", tiny_run(tok, steps=3), tok, echo=lambda *_: None)
    compiled = pretrain(
        source, tmp_path / "b", tiny_run(tok, steps=3, compile=True), tok, echo=lambda *_: None
    )
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert_same_weights(
        weights_of(tmp_path / "a"), weights_of(tmp_path / "b"), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("objective", ["image", "caption"])
def test_single_objectives_train_their_loss_only(shapes, tmp_path, objective):
    source, tok = shapes
    record = pretrain(
        source,
        tmp_path / objective,
        tiny_run(tok, steps=2, objective=objective),
        tok,
        echo=lambda *_: None,
    )
    assert (record["loss_text"] == 0.0) == (objective == "image")
    assert (record["loss_pixel"] == 0.0) == (objective == "caption")


def test_export_writes_an_encoder_only_model(shapes, tmp_path):
    source, tok = shapes
    pretrain(
        source, tmp_path / "run", tiny_run(tok, steps=2, sample_every=2), tok, echo=lambda *_: None
    )
    assert (tmp_path / "run" / "samples" / "step-00000002.json").is_file()
    out = export_encoder(tmp_path / "run", tmp_path / "encoder")
    model = aimv2_mlx.load(out)
    assert isinstance(model, aimv2_mlx.VisionEncoder)
    assert model.config.source["step"] == 2
    keys = set(mx.load(str(out / "model.safetensors")))
    trained = weights_of(tmp_path / "run")
    assert keys == {k.removeprefix("encoder.") for k in trained if k.startswith("encoder.")}
    assert_same_weights(
        {k: trained[f"encoder.{k}"] for k in keys}, mx.load(str(out / "model.safetensors"))
    )
    with pytest.raises(FileExistsError):
        export_encoder(tmp_path / "run", out)
    with pytest.raises(FileNotFoundError, match="not a training run"):
        export_encoder(tmp_path, tmp_path / "x")


def test_bfloat16_option_keeps_float32_masters(shapes, tmp_path):
    source, tok = shapes
    record = pretrain(
        source,
        tmp_path / "bf16",
        tiny_run(tok, steps=2, dtype="bfloat16"),
        tok,
        echo=lambda *_: None,
    )
    assert np.isfinite(record["loss"])
    assert all(v.dtype == mx.float32 for v in weights_of(tmp_path / "bf16").values())


def test_config_round_trips():
    cfg = PretrainConfig.from_preset("large", 32000)
    # the recipe's decoder for AIMv2-L (ml-l3m's aimv2 config)
    assert cfg.decoder == DecoderConfig()
    assert PretrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert dataclasses.replace(cfg, seed=3) != cfg


def test_reconstruction_of_perfect_predictions_is_the_image(rng):
    """Predicted patches are de-normalised with the real patch statistics: exact targets give the
    image back.
    """
    from aimv2_mlx.objective import pixel_targets
    from aimv2_mlx.train.samples import reconstruct

    class Perfect(nn.Module):
        def __init__(self, encoder, targets):
            super().__init__()
            self.encoder = encoder
            self.targets = targets

        # output i = target i + 1 (the last output predicts nothing)
        def decoder(self, tokens, ids=None):
            return mx.concatenate([self.targets[:, 1:], self.targets[:, :1]], axis=1), None

    cfg = tiny_run(train_tokenizer(["a b"], 10, 4))
    pixels = mx.array(rng.normal(size=(2, 28, 28, 3)).astype(np.float32))
    model = Perfect(build_pretrain_model(cfg).encoder, pixel_targets(pixels, 14))
    real, predicted, _ = reconstruct(model, pixels, "multimodal", cfg.mean, cfg.std)
    assert np.abs(real.astype(int) - predicted.astype(int)).max() <= 1


# 4: images per stream; 3: token blocks
@pytest.mark.parametrize(("batch", "compiled"), [(4, True), (3, False)])
def test_a_training_step_with_the_cpu_backend_equals_the_plain_step(
    shapes, rng, batch, compiled, monkeypatch
):
    """Loss, gradient norm and the weights after one AdamW step: CPU backend (kernels with
    their own gradients, rows split over two streams) against the plain MLX layers."""
    from aimv2_mlx import cpu
    from aimv2_mlx.cpu import modules
    from aimv2_mlx.train.optimizer import build_optimizer
    from aimv2_mlx.train.step import TrainStep

    monkeypatch.setattr(modules, "MIN_SPLIT_ROWS", 1)
    _, tok = shapes
    # The recipe's peak learning rate from the first step. AdamW's first step moves each weight by
    # about lr * g / (|g| + eps): a gradient element near eps = 1e-8 turns float32 rounding into
    # a large change of that one element, so weights are compared by each tensor's norm.
    config = tiny_run(tok, batch_size=batch, warmup_steps=0, peak_lr=1e-3, compile=compiled)
    pixels = rng.normal(size=(batch, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(2, tok.vocab_size, size=(batch, config.decoder.context_length)).astype(
        np.int32
    )
    prefix = np.array([1, 3, 2, 1][:batch], dtype=np.int32)
    n = config.encoder.num_patches
    batch_data = StepBatch(
        [MicroBatch(pixels, ids, prefix, np.arange(batch))],
        pixel_count(prefix, n),
        text_count(ids, tok.ignore_ids),
    )
    results = []
    for backend in (False, True):
        model = build_pretrain_model(config, cpu_backend=False)
        if backend:
            cpu.apply(model, streams=[mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)], training=True)
        assert isinstance(model.encoder.trunk, modules.CPUTransformer) == backend
        assert isinstance(model.decoder.pixel_head, modules.CPULinear) == backend
        assert getattr(model.encoder.trunk.blocks[0].mlp.fc1, "row_order_gradient", 0) == backend
        optimizer = build_optimizer(config)
        optimizer.init(model.trainable_parameters())
        stats = TrainStep(model, optimizer, config, tok.ignore_ids)(batch_data)
        results.append((stats, dict(tree_flatten(model.parameters()))))
    (plain, plain_weights), (fast, fast_weights) = results
    for key in ("loss", "loss_pixel", "loss_text", "grad_norm"):
        assert abs(fast[key] - plain[key]) <= 1e-5 * abs(plain[key]), key
    for name, value in plain_weights.items():
        expected, got = (
            np.array(value, dtype=np.float64),
            np.array(fast_weights[name], dtype=np.float64),
        )
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected), name
