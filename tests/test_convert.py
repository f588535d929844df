"""`aimv2 convert`: every layout round-trips against transformers' PyTorch AIMv2 at full L size,
pickles are read safely without torch, bad input fails cleanly, quantization keeps embeddings.

The ml-aim and timm checkpoints are written by hand from the transformers reference's state dict
with the names ml-aim and timm use (not with our key map), so a wrong map would show.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.convert import convert
from aimv2_mlx.safetensors_io import read_header

import huggingface_hub
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from .conftest import timm_key, tiny_config
from .torch_zips import evil_checkpoint

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"
TOL = 1e-4


# --- checkpoints in each layout, written from a transformers state dict -----------------------


def _ml_aim_state(hf: dict, channels_last: bool) -> dict:
    """transformers' names (modeling_aimv2.py) -> ml-aim names, q/k/v fused in that order."""
    out = {}
    for key, value in hf.items():
        value = np.ascontiguousarray(value)
        if ".attention.k_proj." in key or ".attention.v_proj." in key:
            continue
        if ".attention.q_proj." in key:
            block = key.split(".")[2]
            parts = [hf[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"trunk.blocks.{block}.attn.qkv.weight"] = np.concatenate(parts, axis=0)
            continue
        new = (
            key.replace("embeddings.patch_embed.", "preprocessor.patchifier.proj.")
            .replace("embeddings.rms_norm.", "preprocessor.patchifier.norm.")
            .replace("encoder.layers.", "trunk.blocks.")
            .replace("rms_norm1", "norm_1")
            .replace("rms_norm2", "norm_2")
            .replace("attention.out_proj", "attn.proj")
            .replace("ffn.gate_proj", "mlp.fc1")
            .replace("ffn.up_proj", "mlp.fc3")
            .replace("ffn.down_proj", "mlp.fc2")
        )
        if key == "rms_norm.weight":
            new = "trunk.post_trunk_norm.weight"
        if key == "embeddings.position_embedding.weight":
            new, value = "preprocessor.pos_embed", value[None]
        if key == "embeddings.patch_embed.weight" and channels_last:
            value = value.transpose(0, 2, 3, 1)
        out[new] = np.ascontiguousarray(value)
    return out


def _write_layout(hf_folder: Path, layout: str, root: Path) -> Path:
    """The transformers weights as an ml-aim torch safetensors, an ml-aim MLX file or a timm .pth.

    One layout at a time, into a folder the caller removes: four AIMv2-L copies at once would
    need 5 GB of disk.
    """
    import torch
    from safetensors.numpy import save_file

    if layout == "transformers":
        return hf_folder
    hf = _read_safetensors(hf_folder / "model.safetensors")
    folder = root / layout
    folder.mkdir()
    ml_aim = _ml_aim_state(hf, channels_last=layout == "ml-aim-mlx")
    if layout == "ml-aim-torch":
        save_file(ml_aim, folder / "model.safetensors")
    elif layout == "ml-aim-mlx":
        save_file(ml_aim, folder / "mlx_model.safetensors")
    else:
        torch.save(
            {timm_key(k): torch.from_numpy(v) for k, v in ml_aim.items()},
            folder / "pytorch_model.bin",
        )
    return folder


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _hf_vision(folder: Path, seed: int = 0, **config):
    import torch
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(seed)
    reference = Aimv2VisionModel(Aimv2VisionConfig(use_head=False, **config)).eval()
    reference.save_pretrained(folder)
    return reference


def _torch_tokens(reference, pixels: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return reference(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """AIMv2-L random weights saved by transformers, the reference's output and random pixels."""
    pytest.importorskip("torch", reason="needs the test extra (torch) to build the reference")
    pytest.importorskip("transformers", reason="needs the test extra (transformers>=5)")
    root = tmp_path_factory.mktemp("large")
    reference = _hf_vision(root / "transformers")
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
    expected = _torch_tokens(reference, pixels)
    del reference
    gc.collect()
    yield {"source": root / "transformers", "pixels": pixels, "expected": expected}
    shutil.rmtree(root)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["transformers", "ml-aim-torch", "ml-aim-mlx", "timm"])
def test_large_round_trip_every_layout(large, layout, tmp_path):
    result = convert(_write_layout(large["source"], layout, tmp_path), tmp_path / "out")
    assert result.config.source["layout"] == layout
    assert result.config.source["family"] == "large"
    model = aimv2_mlx.load(tmp_path / "out")
    assert aimv2_mlx.parameter_count(model) == 309_197_824
    assert model.config.vision.num_attention_heads == 8
    got = np.array(model(mx.array(large["pixels"])))
    assert np.abs(got - large["expected"]).max() <= TOL
    del model
    gc.collect()


@pytest.mark.slow
def test_quantized_large_keeps_photo_embeddings(large, tmp_path):
    """8-bit and 4-bit AIMv2-L: mean-pooled embeddings of real photos vs float32."""
    skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image (test extra)")
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]
    photos += [str(p) for p in sorted(PHOTOS.glob("*.jpg"))]
    from PIL import Image

    images = [Image.fromarray(p) if isinstance(p, np.ndarray) else p for p in photos]
    source = large["source"]
    full = convert(source, tmp_path / "fp32")
    reference = aimv2_mlx.embed(images, aimv2_mlx.load(full.path), batch_size=len(images))
    sizes = {"fp32": _disk_bytes(full.path)}
    for bits, floor in ((8, 0.99), (4, 0.95)):
        quantized = convert(source, tmp_path / f"q{bits}", q_bits=bits)
        assert (
            json.loads((quantized.path / "config.json").read_text())["quantization"]["bits"] == bits
        )
        got = aimv2_mlx.embed(images, aimv2_mlx.load(quantized.path), batch_size=len(images))
        cosine = (
            (got * reference).sum(1)
            / np.linalg.norm(got, axis=1)
            / np.linalg.norm(reference, axis=1)
        )
        sizes[f"q{bits}"] = _disk_bytes(quantized.path)
        print(
            f"\n{bits}-bit: cosine over {len(images)} photos min {cosine.min():.5f} mean "
            f"{cosine.mean():.5f}; "
            f"on disk {sizes[f'q{bits}'] / 1e6:.1f} MB vs float32 {sizes['fp32'] / 1e6:.1f} MB"
        )
        assert cosine.min() >= floor, f"{bits}-bit cosine {cosine.min()}"
    assert sizes["q4"] < sizes["q8"] < sizes["fp32"] / 3


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_quantized_dequantized_cpu_path_equals_quantized_kernels(tmp_path, rng):
    mx.random.seed(0)
    aimv2_mlx.save(aimv2_mlx.build(tiny_config()), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "q4", q_bits=4, q_group_size=32)
    fast = aimv2_mlx.load(tmp_path / "q4")  # CPU default: dequantized float32 linears
    kernels = aimv2_mlx.load(tmp_path / "q4", dequantize=False)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in kernels.named_modules())
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fast.named_modules())
    x = mx.array(rng.standard_normal((2, 56, 56, 3)).astype(np.float32))
    assert np.abs(np.array(fast(x)) - np.array(kernels(x))).max() <= 1e-5


@pytest.mark.slow
def test_1b_shaped_checkpoint_is_recognised_from_shapes(tmp_path, rng, transformers_reference):
    """A 2-block copy of the AIMv2-1B config, with its config.json removed: all from shapes."""
    reference = _hf_vision(
        tmp_path / "hf",
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=16,
        num_hidden_layers=2,
        image_size=336,
    )
    (tmp_path / "hf" / "config.json").unlink()
    result = convert(tmp_path / "hf", tmp_path / "out")
    vision = result.config.vision
    assert (vision.hidden_size, vision.intermediate_size, vision.num_attention_heads) == (
        2048,
        5632,
        16,
    )
    assert (vision.num_hidden_layers, vision.image_size, vision.is_native) == (2, 336, False)
    assert result.config.source["family"] == "1B"
    pixels = rng.standard_normal((1, 336, 336, 3)).astype(np.float32)
    got = np.array(aimv2_mlx.load(result.path)(mx.array(pixels)))
    assert np.abs(got - _torch_tokens(reference, pixels)).max() <= TOL


@pytest.mark.parametrize("size", ["large", "huge", "1B", "3B"])
def test_every_family_is_inferred_from_shapes_alone(size):
    from aimv2_mlx.weights import infer_config

    preset = aimv2_mlx.preset(f"aimv2-{size}-patch14-448")
    preset.vision.num_hidden_layers = 2
    # lazy: no memory
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(aimv2_mlx.build(preset).parameters())}
    inferred = infer_config(shapes)
    assert inferred.vision == preset.vision


# --- LiT, dtype, verify ------------------------------------------------------------------------


def _tiny_lit(folder: Path):
    import torch
    from transformers import Aimv2Config, Aimv2Model

    torch.manual_seed(0)
    config = Aimv2Config(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            use_head=True,
        ),
        text_config=dict(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            eos_token_id=299,
        ),
        projection_dim=32,
    )
    reference = Aimv2Model._from_config(config, attn_implementation="eager").eval()
    reference.save_pretrained(folder)
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return reference


def test_lit_converts_with_tokenizer_files_and_verifies(tmp_path, transformers_reference):
    _tiny_lit(tmp_path / "lit")
    result = convert(tmp_path / "lit", tmp_path / "out", verify=True)
    assert result.config.is_lit and result.config.text.num_attention_heads == 2
    for name in ("vocab.json", "merges.txt", "preprocessor_config.json", "config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    check = result.verification
    assert check["max_abs_diff"] <= TOL and check["cosine"] >= 0.99999, check


def test_dtype_is_stored_and_recorded(tmp_path, rng):
    mx.random.seed(0)
    model = aimv2_mlx.build(tiny_config())
    aimv2_mlx.save(model, tmp_path / "src")
    result = convert(tmp_path / "src", tmp_path / "f16", dtype="float16")
    header = read_header(tmp_path / "f16" / "model.safetensors")
    assert {entry.dtype for entry in header.values()} == {"float16"}
    assert result.config.source["conversion"]["dtype"] == "float16"
    x = mx.array(rng.standard_normal((1, 56, 56, 3)).astype(np.float32))
    half = aimv2_mlx.load(tmp_path / "f16")(x)
    assert half.dtype == mx.float16
    assert np.abs(np.array(half.astype(mx.float32)) - np.array(model(x))).max() <= 0.05


def test_quantization_rejects_a_group_size_that_does_not_divide(tmp_path):
    aimv2_mlx.save(aimv2_mlx.build(tiny_config()), tmp_path / "src")
    with pytest.raises(ValueError, match="q-group-size 128 does not divide"):
        convert(tmp_path / "src", tmp_path / "out", q_bits=4, q_group_size=128)
    assert not (tmp_path / "out").exists()


def test_sharded_output_has_an_index_and_loads(tmp_path, rng):
    mx.random.seed(0)
    model = aimv2_mlx.build(tiny_config(depth=3))
    aimv2_mlx.save(model, tmp_path / "src")
    result = convert(tmp_path / "src", tmp_path / "out", max_shard_bytes=200_000)
    assert len(result.shards) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == result.shards
    for shard in result.shards:
        assert (tmp_path / "out" / shard).stat().st_size <= 200_000 + 4096  # + header
    loaded = aimv2_mlx.load(tmp_path / "out")
    ours = dict(tree_flatten(loaded.parameters()))
    assert all(
        np.array_equal(np.array(ours[k]), np.array(v)) for k, v in tree_flatten(model.parameters())
    )
    # load() adds the CPU kernels:
    x = mx.array(rng.standard_normal((1, 56, 56, 3)).astype(np.float32))
    np.testing.assert_allclose(np.array(loaded(x)), np.array(model(x)), rtol=1e-5, atol=1e-5)


# --- the command: pickles, bad input, hub, upload ------------------------------------------------


def _aimv2(*args, env_extra=None, prelude: str = "") -> subprocess.CompletedProcess:
    code = (
        f"{prelude}\nfrom aimv2_mlx.cli.app import main\nimport sys\n"
        "sys.argv = ['aimv2', *sys.argv[1:]]\nmain()\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env
    )


def _assert_clean_failure(result, tmp_path: Path, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: "), line
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], (
        "temporary folder left behind"
    )


def test_malicious_pth_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "src").mkdir()
    evil_checkpoint(tmp_path / "src" / "model.pth", marker)
    result = _aimv2("convert", tmp_path / "src", tmp_path / "out")
    _assert_clean_failure(result, tmp_path, "model.pth", "system")
    assert not marker.exists()


def test_torch_saved_pth_converts_like_its_safetensors_twin_without_torch(
    tmp_path, transformers_reference
):
    import torch

    _hf_vision(
        tmp_path / "st",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
    )
    (tmp_path / "pth").mkdir()
    state = {
        k: torch.from_numpy(v)
        for k, v in _read_safetensors(tmp_path / "st" / "model.safetensors").items()
    }
    torch.save(state, tmp_path / "pth" / "weights.pth")
    (tmp_path / "pth" / "config.json").write_bytes((tmp_path / "st" / "config.json").read_bytes())
    no_torch = "import sys; sys.modules['torch'] = None  # any import of torch now fails"
    result = _aimv2("convert", tmp_path / "pth", tmp_path / "from-pth", prelude=no_torch)
    assert result.returncode == 0, result.stderr
    convert(tmp_path / "st", tmp_path / "from-st")
    a = _read_safetensors(tmp_path / "from-pth" / "model.safetensors")
    b = _read_safetensors(tmp_path / "from-st" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _tiny_ml_aim(folder: Path) -> dict[str, mx.array]:
    mx.random.seed(0)
    weights = dict(tree_flatten(aimv2_mlx.build(tiny_config()).parameters()))
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return weights


@pytest.mark.parametrize(
    "damage", ["missing", "extra", "shape", "truncated", "index-outside", "index-missing"]
)
def test_bad_checkpoint_fails_in_one_line_and_leaves_nothing(tmp_path, damage):
    src = tmp_path / "src"
    weights = _tiny_ml_aim(src)
    key = "trunk.blocks.1.mlp.fc2.weight"
    needles = [key]
    if damage == "missing":
        del weights[key]
    elif damage == "extra":
        key = "trunk.blocks.1.mlp.fc9.weight"
        weights[key], needles = weights["trunk.blocks.1.mlp.fc2.weight"], [key]
    elif damage == "shape":
        weights[key] = weights[key][:, :-1]
    if damage in ("missing", "extra", "shape"):
        mx.save_safetensors(str(src / "model.safetensors"), weights)
    elif damage == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
        needles = ["model.safetensors", "truncated"]
    else:
        shard = (
            "../elsewhere.safetensors"
            if damage == "index-outside"
            else "model-00002-of-00002.safetensors"
        )
        weight_map = {k: "model.safetensors" for k in weights}
        weight_map[key] = shard
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (tmp_path / "elsewhere.safetensors").write_bytes((src / "model.safetensors").read_bytes())
        needles = ["model.safetensors.index.json", shard]
    _assert_clean_failure(_aimv2("convert", src, tmp_path / "out"), tmp_path, *needles)


def test_official_name_uses_pinned_revision_and_safe_patterns(monkeypatch, tmp_path):
    from aimv2_mlx.config import ML_AIM_REVISIONS
    from aimv2_mlx.model import resolve

    calls = []

    def fake_download(repo, **kwargs):
        calls.append((repo, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    location = resolve("aimv2-large-patch14-224")
    repo, kwargs = calls[-1]
    assert repo == "apple/aimv2-large-patch14-224"
    assert kwargs["revision"] == location.revision == ML_AIM_REVISIONS["aimv2-large-patch14-224"]
    assert set(kwargs["allow_patterns"]) == {"*.json", "*.safetensors", "*.txt"}
    resolve("apple/aimv2-huge-patch14-448", revision="main", allow_pickle=True)
    repo, kwargs = calls[-1]
    assert kwargs["revision"] == "main" and {"*.bin", "*.pth"} <= set(kwargs["allow_patterns"])


def test_official_name_converts_from_a_prefilled_cache(tmp_path, monkeypatch):
    from aimv2_mlx.config import ML_AIM_REVISIONS

    name = "aimv2-large-patch14-224-distilled"
    revision = ML_AIM_REVISIONS[name]
    base = tmp_path / "hub" / f"models--apple--{name}"
    _tiny_ml_aim(tmp_path / "weights")
    (base / "snapshots").mkdir(parents=True)
    (tmp_path / "weights").rename(base / "snapshots" / revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = convert(f"apple/{name}", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["name"] == name
    assert (
        config["source"]["origin"] == f"hf://apple/{name}"
        and config["source"]["revision"] == revision
    )
    assert result.config.source["layout"] == "ml-aim-mlx"


def test_upload_builds_the_hub_calls(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    _tiny_ml_aim(tmp_path / "src")
    result = convert(tmp_path / "src", tmp_path / "out", upload_repo="someone/aimv2-tiny-mlx")
    assert result.uploaded_to == "someone/aimv2-tiny-mlx"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][2]["exist_ok"] is True
    assert calls[1][2]["folder_path"] == str(tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text().startswith("# ")


def test_verify_says_it_skips_without_torch(tmp_path):
    _tiny_ml_aim(tmp_path / "src")
    no_torch = "import sys; sys.modules['torch'] = None"
    result = _aimv2("convert", tmp_path / "src", tmp_path / "out", "--verify", prelude=no_torch)
    assert result.returncode == 0, result.stderr
    assert "verify: skipped" in result.stdout and "torch" in result.stdout


def test_verify_reports_difference_and_cosine(tmp_path, transformers_reference):
    _hf_vision(
        tmp_path / "src",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
    )
    result = _aimv2("convert", tmp_path / "src", tmp_path / "out", "--verify", "-q", "8")
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("verify:"))
    diff = float(line.split("max abs difference ")[1].split(",")[0])
    cosine = float(line.split("cosine similarity ")[1].split(" ")[0])
    # 8-bit: close to, but not exactly, the reference
    assert 0 < diff < 0.5 and 0.99 < cosine <= 1.0


def test_ml_aim_torch_lit_without_config_converts_with_head_overrides(tmp_path, rng):
    """ml-aim's torch LiT layout (conv channels-first, no config.json): heads come from the
    flags.
    """
    from aimv2_mlx.config import EncoderConfig, ModelConfig, TextConfig

    mx.random.seed(0)
    config = ModelConfig(
        name="tiny-lit",
        projection_dim=32,
        vision=EncoderConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            image_size=56,
            use_head=True,
        ),
        text=TextConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=16,
            eos_token_id=99,
        ),
    )
    model = aimv2_mlx.build(config)
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    key = "image_encoder.preprocessor.patchifier.proj.weight"
    weights[key] = weights[key].transpose(0, 3, 1, 2)
    weights["log_logit_scale"] = weights["log_logit_scale"].reshape(1)
    (tmp_path / "src").mkdir()
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in weights.items()},
        tmp_path / "src" / "model.safetensors",
    )
    result = convert(
        tmp_path / "src", tmp_path / "out", num_heads=2, text_num_heads=2, name="tiny-lit"
    )
    assert result.config.source["layout"] == "ml-aim-torch" and result.config.is_lit
    converted = aimv2_mlx.load(tmp_path / "out")
    pixels = mx.array(rng.standard_normal((2, 56, 56, 3)).astype(np.float32))
    ids = mx.array(np.concatenate([rng.integers(1, 99, (3, 10)), np.full((3, 1), 99)], axis=1))
    for got, expected in zip(converted.logits(pixels, ids), model.logits(pixels, ids), strict=True):
        assert np.abs(np.array(got) - np.array(expected)).max() <= 1e-5
