"""load(): our folders, PyTorch layouts converted in memory, the hub cache, and clear errors."""

from __future__ import annotations

import json
import shutil

import aimv2_mlx
from aimv2_mlx import cpu
from aimv2_mlx.model import BUNDLED_DIR, load_named
from aimv2_mlx.weights import ML_AIM_MLX, ML_AIM_TORCH, TIMM, TRANSFORMERS, detect_layout, to_ours

import huggingface_hub.constants
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from .conftest import timm_key, tiny_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tiny_saved(tmp_path, **kwargs):
    mx.random.seed(0)
    model = aimv2_mlx.build(tiny_config(**kwargs))
    return model, aimv2_mlx.save(model, tmp_path / "ours")


def _pixels(rng, size=56):
    return mx.array(rng.standard_normal((2, size, size, 3)).astype(np.float32))


def test_our_folder_round_trip(tmp_path, rng):
    model, folder = _tiny_saved(tmp_path, head=True)
    loaded = aimv2_mlx.load(folder)
    assert loaded.config == model.config
    x = _pixels(rng)
    # load() applies it too
    assert np.array_equal(np.array(cpu.apply(model, streams=())(x)), np.array(loaded(x)))
    assert np.array_equal(np.array(model.encode_image(x)), np.array(loaded.encode_image(x)))


def _timm_state(ours: dict) -> dict:
    """Our keys rewritten by hand into timm's names (timm's aimv2 model names), torch conv
    layout.
    """
    out = {}
    for key, value in ours.items():
        value = np.array(value)
        key = timm_key(key)
        if key == "patch_embed.proj.weight":
            value = value.transpose(0, 3, 1, 2)
        out[key] = mx.array(value)
    return out


def test_layouts_are_detected_and_mapped(tmp_path):
    model, _ = _tiny_saved(tmp_path)
    ours = dict(tree_flatten(model.parameters()))
    assert detect_layout(ours) == ML_AIM_MLX
    assert to_ours(ours).keys() == ours.keys()

    torch_layout = dict(ours)
    torch_layout["preprocessor.patchifier.proj.weight"] = ours[
        "preprocessor.patchifier.proj.weight"
    ].transpose(0, 3, 1, 2)
    assert detect_layout(torch_layout) == ML_AIM_TORCH
    back = to_ours(torch_layout)
    assert all(np.array_equal(np.array(back[k]), np.array(ours[k])) for k in ours)

    timm = _timm_state(ours)
    assert detect_layout(timm) == TIMM
    back = to_ours(timm)
    assert back.keys() == ours.keys()
    assert all(np.array_equal(np.array(back[k]), np.array(ours[k])) for k in ours)


def test_transformers_folder_loads(tmp_path, rng, transformers_reference):
    import torch
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(0)
    reference = Aimv2VisionModel(
        Aimv2VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            use_head=False,
        )
    ).eval()
    reference.save_pretrained(tmp_path / "hf")
    model = aimv2_mlx.load(tmp_path / "hf")
    weights = {k: mx.array(v.numpy()) for k, v in reference.state_dict().items()}
    assert detect_layout(weights) == TRANSFORMERS
    x = rng.standard_normal((1, 56, 56, 3)).astype(np.float32)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    assert np.abs(np.array(model(mx.array(x))) - expected).max() <= 1e-5
    assert model.config.vision.num_attention_heads == 2


def _fill_cache(cache, repo: str, folder):
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / COMMIT)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)


def test_hub_id_loads_from_cache_offline(tmp_path, rng, monkeypatch):
    model, folder = _tiny_saved(tmp_path)
    cache = tmp_path / "hub"
    _fill_cache(cache, "someone/aimv2-tiny", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = aimv2_mlx.load("someone/aimv2-tiny")
    x = _pixels(rng)
    # load() applies it too
    assert np.array_equal(np.array(cpu.apply(model, streams=())(x)), np.array(loaded(x)))


def test_uncached_hub_id_names_the_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(aimv2_mlx.ModelNotFoundError, match="apple/aimv2-large-patch14-224"):
        aimv2_mlx.load("aimv2-large-patch14-224")


def test_load_default_falls_back_to_bundled(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = aimv2_mlx.load_default()
    assert model.config.name == aimv2_mlx.load("bundled").config.name
    captured = capsys.readouterr()
    notice = captured.err.strip().splitlines()
    assert (
        len(notice) == 1 and "apple/aimv2-large-patch14-224" in notice[0] and "bundled" in notice[0]
    )
    assert captured.out == ""  # stdout stays clean for machine-readable output


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_bad_checkpoint_names_the_tensor(tmp_path, damage):
    model, folder = _tiny_saved(tmp_path)
    weights = dict(tree_flatten(model.parameters()))
    key = "trunk.blocks.1.mlp.fc2.weight"
    if damage == "missing":
        del weights[key]
    elif damage == "extra":
        weights["trunk.blocks.1.mlp.fc4.weight"] = weights[key]
        key = "trunk.blocks.1.mlp.fc4.weight"
    else:
        weights[key] = weights[key][:, :-1]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(aimv2_mlx.CheckpointError, match=key.replace(".", r"\.")):
        aimv2_mlx.load(folder)


def test_truncated_file_is_a_clear_error(tmp_path):
    _, folder = _tiny_saved(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(aimv2_mlx.CheckpointError, match=r"model\.safetensors"):
        aimv2_mlx.load(folder)


def test_config_json_round_trip(tmp_path):
    config = aimv2_mlx.preset("apple/aimv2-large-patch14-224-lit")
    config.save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["format"] == "aimv2-mlx" and data["projection_dim"] == 768
    assert aimv2_mlx.ModelConfig.load(tmp_path) == config


def test_presets_cover_the_released_models():
    names = aimv2_mlx.config.PRESETS
    assert len(names) == 16
    assert names["aimv2-3B-patch14-448"].vision.hidden_size == 3072
    assert names["aimv2-3B-patch14-448"].vision.num_patches == 1024
    assert names["aimv2-large-patch14-native"].vision.is_native
    counts = {"large": 309_197_824, "huge": 680_851_968}
    for size, count in counts.items():
        shapes = aimv2_mlx.build(names[f"aimv2-{size}-patch14-224"])
        assert aimv2_mlx.parameter_count(shapes) == count


def test_the_model_option_names_default_a_folder_or_a_hub_id(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_named("default").location.path == BUNDLED_DIR  # the official one is not cached
    assert "using the bundled offline model" in capsys.readouterr().err
    _, folder = _tiny_saved(tmp_path)
    assert load_named(str(folder)).location.path == folder
    with pytest.raises(aimv2_mlx.ModelNotFoundError, match="someone/missing"):
        load_named("someone/missing")
