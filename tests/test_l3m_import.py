"""apple/ml-l3m checkpoints in: a consolidated file built here in ml-l3m's layout (names from
src/l3m of the AIMv2 config, written with torch.save as dcp_to_torch_save + other.pth do) converts,
embeds like the same weights loaded directly, and starts or continues a pre-training run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.config import DecoderConfig, EncoderConfig
from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.l3m import open_training_checkpoint
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.batches import BatchPlan
from aimv2_mlx.train.checkpoint import latest_checkpoint, load_checkpoint
from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.loop import build_pretrain_model, pretrain
from aimv2_mlx.train.optimizer import build_optimizer
from aimv2_mlx.train.step import TrainStep
from aimv2_mlx.weights import CheckpointError

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from .conftest import one_line_error, run_cli

torch = pytest.importorskip("torch", reason="writing an ml-l3m checkpoint needs torch (test extra)")

ENC, DEC = "models.image_encoder.", "models.text_decoder."


def l3m_name(ours: str) -> list[str]:
    """ml-l3m's name(s) for one of our PretrainModel parameters (ml-l3m keeps q, k, v apart)."""
    tower, rest = ours.split(".", 1)
    prefix = ENC if tower == "encoder" else DEC
    fixed = {
        "preprocessor.pos_embed": "preprocessor.blocks.0.pos_embed",
        "image_projector.weight": "preprocessor.vision_preprocessor.module.weight",
        "image_projector.bias": "preprocessor.vision_preprocessor.module.bias",
        "text_pos_embed": "preprocessor.text_preprocessor.positional_embedding",
        "cls": "preprocessor.text_preprocessor.cls_token",
        "text_embedding.weight": "preprocessor.text_preprocessor.text_embedding.weight",
        "text_head.weight": "head.blocks.0.linear.weight",
        "pixel_head.weight": "head.blocks.1.linear.weight",
    }
    if rest in fixed:
        return [prefix + fixed[rest]]
    if rest.startswith("preprocessor.patchifier."):
        return [prefix + rest.replace("preprocessor.", "preprocessor.blocks.0.")]
    if rest.endswith("attn.qkv.weight"):
        return [prefix + rest.replace("qkv", f"{part}_proj") for part in "qkv"]
    return [prefix + rest]


def to_l3m(tree: dict[str, mx.array]) -> dict:
    """Our parameters (or AdamW moments of them) under ml-l3m's names and torch layouts."""
    out = {}
    for key, value in tree.items():
        array = np.array(value.astype(mx.float32))
        if key.endswith("patchifier.proj.weight"):
            array = array.transpose(0, 3, 1, 2)  # (O, kH, kW, I) -> torch's (O, I, kH, kW)
        names = l3m_name(key)
        for name, part in zip(names, np.split(array, len(names), axis=0), strict=True):
            out[name] = torch.from_numpy(np.ascontiguousarray(part))
    return out


class TrainingState:
    """Stands in for the objects other.pth holds (the Hydra config, the scheduler, ...)."""

    def __init__(self):
        self.iteration, self.notes = 3, {"a": [1, 2]}


class Executes:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_l3m(path: Path, model, optimizer=None, step: int = 0, **extra) -> Path:
    """A consolidated ml-l3m checkpoint: "model", "optimizer" (get_state_dict's, by parameter
    name) and other.pth's entries."""
    checkpoint = {"model": to_l3m(dict(tree_flatten(model.parameters()))), **extra}
    if optimizer is not None:
        moments: dict[str, dict] = {}
        for o in optimizer.optimizers:
            for key, value in tree_flatten(o.state):
                param, _, leaf = key.rpartition(".")
                if leaf in ("m", "v"):
                    moments.setdefault(param, {})[leaf] = value
        m = to_l3m({k: v["m"] for k, v in moments.items()})
        v = to_l3m({k: v["v"] for k, v in moments.items()})
        checkpoint["optimizer"] = {
            "state": {
                name: {"step": step, "exp_avg": m[name], "exp_avg_sq": v[name]} for name in m
            },
            "param_groups": [
                {
                    "lr": 1e-3,
                    "betas": (0.9, 0.95),
                    "eps": 1e-8,
                    "weight_decay": 1e-4,
                    "params": sorted(m),
                }
            ],
        }
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("l3m-shapes")
    source = load_captioned(write_shapes(root / "data", 16, size=28))
    return source, train_tokenizer(source.captions(), 64, 10)


def tiny(tokenizer, **overrides) -> PretrainConfig:
    # One head: the count a checkpoint without config.json is given for width 32 (heads are not
    # in a state dict).
    values = dict(
        encoder=EncoderConfig(32, 2, 1, 64, image_size=28),
        decoder=DecoderConfig(32, 2, 1, 64, tokenizer.vocab_size, 10),
        batch_size=4,
        steps=6,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=1000,
        compile=False,
        seed=1,
    )
    values.update(overrides)
    return PretrainConfig(**values)


def test_a_consolidated_l3m_file_converts_and_embeds_like_its_weights_loaded_directly(
    tmp_path, shapes, rng
):
    config = tiny(shapes[1], seed=7)
    model = build_pretrain_model(config, cpu_backend=False)
    source = write_l3m(tmp_path / "consolidated.pth", model, iteration=41)
    result = run_cli("convert", source, tmp_path / "converted")
    assert result.exit_code == 0, result.output
    assert "ml-l3m layout" in result.output
    converted = aimv2_mlx.load(tmp_path / "converted")
    assert converted.config.vision == config.encoder
    pixels = mx.array(rng.normal(size=(3, 28, 28, 3)).astype(np.float32))
    expected = np.array(model.encoder(pixels))
    # load() gives the CPU backend's kernels, whose float32 rounding differs from the plain layers'
    np.testing.assert_allclose(np.array(converted(pixels)), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        np.array(aimv2_mlx.load(source)(pixels)), expected, rtol=0, atol=1e-5
    )


def test_other_entries_holding_arbitrary_classes_leave_the_model_part_loadable_with_nothing_run(
    tmp_path, shapes, rng
):
    marker = tmp_path / "ran"
    model = build_pretrain_model(tiny(shapes[1]), cpu_backend=False)
    path = write_l3m(
        tmp_path / "with-extras.pth",
        model,
        cfg=TrainingState(),
        loss_scaler=Executes(marker),
        iteration=7,
    )
    opened = open_training_checkpoint(path)
    assert not marker.exists()
    assert {"posix.system", f"{__name__}.TrainingState"} <= set(opened.refused) or {
        "os.system",
        f"{__name__}.TrainingState",
    } <= set(opened.refused)
    assert opened.entries == ["model", "cfg", "loss_scaler", "iteration"]
    pixels = mx.array(rng.normal(size=(2, 28, 28, 3)).astype(np.float32))
    np.testing.assert_allclose(
        np.array(aimv2_mlx.load(path)(pixels)), np.array(model.encoder(pixels)), atol=1e-5
    )
    assert not marker.exists()
    notes = []
    pretrain(
        shapes[0],
        tmp_path / "run",
        tiny(shapes[1]),
        shapes[1],
        init_from=path,
        until=1,
        echo=notes.append,
    )
    assert any(
        "globals were refused, not run" in n and "TrainingState" in n for n in map(str, notes)
    )
    assert not marker.exists()


def test_an_arbitrary_class_inside_the_model_part_is_refused_naming_it_with_nothing_run(
    tmp_path, shapes
):
    marker = tmp_path / "ran"
    model = build_pretrain_model(tiny(shapes[1]), cpu_backend=False)
    state = to_l3m(dict(tree_flatten(model.parameters())))
    state[ENC + "trunk.post_trunk_norm.weight"] = Executes(marker)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth.*post_trunk_norm.*(posix|os)\.system"):
        open_training_checkpoint(tmp_path / "bad.pth")
    one_line_error(run_cli("convert", tmp_path / "bad.pth", tmp_path / "out"), "bad.pth", "system")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_dcp_folder_is_refused_with_the_command_that_consolidates_it(tmp_path):
    folder = tmp_path / "checkpoint_50000"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"\x80\x04.")
    (folder / "__0_0.distcp").write_bytes(b"")
    one_line_error(run_cli("convert", folder, tmp_path / "out"), str(folder), "dcp_to_torch_save")


def _first_loss_set_directly(config, weights, shapes) -> float:
    """A run whose weights were set directly: the same model, data and step, no file in between."""
    source, tok = shapes
    model = build_pretrain_model(config)
    model.update(weights)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    return TrainStep(model, optimizer, config, tok.ignore_ids)(
        BatchPlan(source, tok, config).step(0)
    )["loss"]


def test_init_from_gives_the_first_step_loss_of_a_run_whose_weights_were_set_directly(
    tmp_path, shapes
):
    source, tok = shapes
    donor = build_pretrain_model(tiny(tok, seed=11), cpu_backend=False)
    path = write_l3m(tmp_path / "l3m.pth", donor, iteration=99)
    config = tiny(tok)
    notes = []
    record = pretrain(
        source, tmp_path / "run", config, tok, init_from=path, until=1, echo=notes.append
    )
    assert record["step"] == 1
    assert any(
        "optimizer state not taken: the file has no optimizer state" in str(n) for n in notes
    )
    expected = _first_loss_set_directly(
        config, tree_unflatten(list(tree_flatten(donor.parameters()))), shapes
    )
    assert abs(record["loss"] - expected) <= 1e-6 * abs(expected)
    fresh = pretrain(source, tmp_path / "fresh", config, tok, until=1, echo=lambda *_: None)
    assert abs(fresh["loss"] - expected) > 1e-3  # the file's weights made the difference


def _read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_init_from_with_adamw_state_continues_as_resuming_the_run_it_came_from(tmp_path, shapes):
    """A run saved at step 3 in ml-l3m's layout (weights and AdamW moments, by name) continues
    to step 5 exactly as resuming the original run does."""
    source, tok = shapes
    config = tiny(tok)
    quiet = lambda *_: None  # noqa: E731
    pretrain(source, tmp_path / "original", config, tok, until=3, echo=quiet)
    model = build_pretrain_model(config, cpu_backend=False)
    optimizer = build_optimizer(config)
    assert load_checkpoint(latest_checkpoint(tmp_path / "original"), model, optimizer)["step"] == 3
    path = write_l3m(tmp_path / "at-3.pth", model, optimizer, step=3, iteration=2)
    notes = []
    pretrain(
        source, tmp_path / "continued", config, tok, init_from=path, until=5, echo=notes.append
    )
    assert any("AdamW moments at step 3" in str(n) for n in notes)
    pretrain(source, tmp_path / "original", None, None, resume=True, until=5, echo=quiet)
    original, continued = _read_log(tmp_path / "original"), _read_log(tmp_path / "continued")
    assert [r["step"] for r in continued] == [4, 5]
    for mine, theirs in zip(continued, original[3:], strict=True):
        for key in ("loss", "loss_pixel", "loss_text", "lr"):
            assert abs(mine[key] - theirs[key]) <= 1e-5 * abs(theirs[key]), key


def test_init_from_refuses_a_run_shorter_than_the_files_optimizer_step(tmp_path, shapes):
    source, tok = shapes
    config = tiny(tok)
    model = build_pretrain_model(config, cpu_backend=False)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    path = write_l3m(tmp_path / "late.pth", model, optimizer, step=50)
    with pytest.raises(ValueError, match=r"late\.pth.*step 50.*--init-weights-only"):
        pretrain(source, tmp_path / "run", config, tok, init_from=path, echo=lambda *_: None)
    # refused before the run folder was written
    assert not (tmp_path / "run" / "config.json").exists()
    record = pretrain(
        source,
        tmp_path / "run",
        config,
        tok,
        init_from=path,
        init_weights_only=True,
        until=1,
        echo=lambda *_: None,
    )
    assert record["step"] == 1


def test_aimv2_pretrain_init_from_takes_the_files_sizes_and_refuses_size_flags(tmp_path, shapes):
    source, tok = shapes
    tok.save(tmp_path / "tokenizer.json")
    donor = build_pretrain_model(
        tiny(tok, decoder=DecoderConfig(32, 3, 1, 64, tok.vocab_size, 10)), cpu_backend=False
    )
    path = write_l3m(tmp_path / "l3m.pth", donor)
    data = Path(source.origin)
    result = run_cli(
        "pretrain",
        data,
        "-o",
        tmp_path / "run",
        "--init-from",
        path,
        "--tokenizer",
        tmp_path / "tokenizer.json",
        "--decoder-heads",
        1,
        "--steps",
        1,
        "-b",
        4,
        "--no-compile",
    )
    assert result.exit_code == 0, result.output
    assert "started from" in result.output
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (
        run_config["decoder"]["num_hidden_layers"] == 3
        and run_config["encoder"]["hidden_size"] == 32
    )
    one_line_error(
        run_cli("pretrain", data, "-o", tmp_path / "other", "--init-from", path, "--width", 64),
        "--width",
        "l3m.pth",
    )


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda state, name: state[name].update(exp_avg=torch.zeros(3)), "no AdamW moments"),
        (lambda state, name: state[name].update(step=9), "different optimizer steps"),
        (lambda state, name: state.pop(name), "no AdamW moments"),
    ],
)
def test_an_optimizer_state_that_does_not_map_leaves_the_weights_and_step_zero(
    tmp_path, shapes, damage, why
):
    source, tok = shapes
    config = tiny(tok)
    model = build_pretrain_model(config, cpu_backend=False)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    path = write_l3m(tmp_path / "l3m.pth", model, optimizer, step=4)
    checkpoint = torch.load(path, weights_only=False)
    damage(checkpoint["optimizer"]["state"], DEC + "trunk.blocks.0.attn.k_proj.weight")
    torch.save(checkpoint, path)
    notes = []
    record = pretrain(
        source, tmp_path / "run", config, tok, init_from=path, until=1, echo=notes.append
    )
    assert record["step"] == 1  # step 0 + 1: the moments were not taken
    assert any(why in str(n) and "the run starts at step 0" in str(n) for n in notes), notes


def test_a_pickle_naming_thousands_of_classes_is_refused_before_allocating_them(tmp_path):
    import zipfile

    opcodes = b"\x80\x02" + b"".join(f"cmodule{i}\nName\n0".encode() for i in range(1001)) + b"}."
    with zipfile.ZipFile(tmp_path / "many.pth", "w") as archive:
        archive.writestr("archive/data.pkl", opcodes)
    with pytest.raises(CheckpointError, match=r"many\.pth.*more than 1000 globals"):
        open_training_checkpoint(tmp_path / "many.pth")


def test_an_l3m_file_is_read_and_planned_without_torch(tmp_path, shapes):
    import subprocess
    import sys

    model = build_pretrain_model(tiny(shapes[1]), cpu_backend=False)
    optimizer = build_optimizer(tiny(shapes[1]))
    optimizer.init(model.trainable_parameters())
    path = write_l3m(tmp_path / "l3m.pth", model, optimizer, step=2, cfg=TrainingState())
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "from aimv2_mlx.train.init import L3mStart\n"
        f"start = L3mStart({str(path)!r})\n"
        "print(start.step, len(start.recipes), start.sizes()[1].num_hidden_layers)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", str(len(dict(tree_flatten(model.parameters())))), "2"]
