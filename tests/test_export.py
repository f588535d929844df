"""`aimv2 export --format transformers|ml-aim`: transformers' own classes load the result strictly
and agree with ours on real photos through the exported image processor; ml-aim's names equal the
convert tests' hand-written rewrite; export -> convert -> load gives back the same bits.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.checkpoint_io import open_checkpoint
from aimv2_mlx.config import DecoderConfig, EncoderConfig, ModelConfig, PreprocessConfig, TextConfig
from aimv2_mlx.convert import convert
from aimv2_mlx.export_card import how_made, licence_of
from aimv2_mlx.export_formats import foreign_plan, write_tensors
from aimv2_mlx.train.export import export

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest

from .clip_bpe import write_vocab
from .conftest import one_line_error, run_cli, tiny_config
from .test_convert import _hf_vision, _ml_aim_state, _read_safetensors

TOL = 1e-4


def _photos():
    data = pytest.importorskip("skimage.data", reason="needs scikit-image (test extra)")
    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def _hub_pixels(folder: Path, photos) -> np.ndarray:
    """The photos through transformers' image processor built from the exported config (NHWC)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    return processor(images=photos, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


def _load_strictly(cls, folder: Path, **kwargs):
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    return model.eval()


@pytest.fixture
def scratch(tmp_path):
    """A tmp_path emptied after the test: an AIMv2-L run and its exports take gigabytes."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def _pretrained_run(root: Path, encoder: EncoderConfig, decoder_depth: int, batch: int) -> Path:
    """A random init plus 2 AIMv2 pre-training steps on the shapes data set."""
    from aimv2_mlx.data.captioned import load_captioned
    from aimv2_mlx.data.shapes import write_shapes
    from aimv2_mlx.tokenizer import train_tokenizer
    from aimv2_mlx.train.config import PretrainConfig
    from aimv2_mlx.train.loop import pretrain

    source = load_captioned(write_shapes(root / "data", 2 * batch, size=encoder.image_size))
    tokenizer = train_tokenizer(source.captions(), 64, 10)
    decoder = DecoderConfig(
        encoder.hidden_size,
        decoder_depth,
        encoder.num_attention_heads,
        encoder.intermediate_size,
        tokenizer.vocab_size,
        10,
    )
    config = PretrainConfig(
        encoder=encoder,
        decoder=decoder,
        batch_size=batch,
        steps=2,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=1000,
        compile=False,
    )
    pretrain(source, root / "run", config, tokenizer, echo=lambda *_: None)
    return root / "run"


def _check_transformers_export(run: Path, out: Path) -> None:
    import torch
    from transformers import Aimv2VisionModel

    result = run_cli("export", run, out, "--format", "transformers")
    assert result.exit_code == 0, result.output
    reference = _load_strictly(Aimv2VisionModel, out)
    ours = aimv2_mlx.load(max((run / "checkpoints").glob("step-*[0-9]")) / "encoder")
    pixels = _hub_pixels(out, _photos())
    with torch.inference_mode():
        expected = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    got = np.array(ours(mx.array(pixels)))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "random initialisation" in card and "for 2 steps" in card


def test_a_tiny_pretrained_model_exported_for_transformers_loads_strictly_and_matches_on_photos(
    tmp_path, transformers_reference
):
    run = _pretrained_run(
        tmp_path, EncoderConfig(32, 2, 2, 64, image_size=28), decoder_depth=1, batch=4
    )
    _check_transformers_export(run, tmp_path / "hf")


@pytest.mark.slow
def test_a_pretrained_aimv2_large_exported_for_transformers_loads_strictly_and_matches_on_photos(
    scratch, transformers_reference
):
    """Full AIMv2-L encoder: random init + 2 steps at batch 2 (1-block decoder, left behind)."""
    run = _pretrained_run(scratch, EncoderConfig(), decoder_depth=1, batch=2)
    encoder = open_checkpoint(max((run / "checkpoints").glob("step-*[0-9]")) / "encoder")
    assert sum(int(np.prod(t.shape)) for t in encoder.tensors.values()) == 309_197_824
    _check_transformers_export(run, scratch / "hf")
    gc.collect()


@pytest.mark.parametrize("native, head", [(True, False), (False, True)])
def test_native_and_head_variants_load_strictly_in_transformers_and_match(
    tmp_path, transformers_reference, rng, native, head
):
    import torch
    from transformers import Aimv2VisionModel

    mx.random.seed(2)
    model = aimv2_mlx.build(tiny_config(native=native, head=head))
    aimv2_mlx.save(model, tmp_path / "src")
    export(tmp_path / "src", tmp_path / "hf", "transformers")
    reference = _load_strictly(Aimv2VisionModel, tmp_path / "hf")
    pixels = rng.standard_normal((1, 56, 84 if native else 56, 3)).astype(np.float32)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    tokens = expected.last_hidden_state.numpy()
    assert np.abs(np.array(model(mx.array(pixels))) - tokens).max() <= TOL
    if head:  # the attention-pooling head: transformers' pooler_output
        pooled = np.array(model.encode_image(mx.array(pixels)))
        assert np.abs(pooled - expected.pooler_output.numpy()).max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["transformers", "ml-aim"])
def test_exporting_aimv2_large_streams_in_a_fraction_of_its_size(scratch, fmt):
    """Peak memory of an export in a fresh process, above that of the imports alone."""
    mx.random.seed(0)
    model = aimv2_mlx.build(aimv2_mlx.preset("aimv2-large-patch14-224"))
    aimv2_mlx.save(model, scratch / "L")
    del model
    gc.collect()
    size = (scratch / "L" / "model.safetensors").stat().st_size
    # VmHWM: this process's own peak (ru_maxrss would start from the forking parent's)
    status = "open('/proc/self/status').read()"
    peak = f"import re; print(int(re.search(r'VmHWM:\\s+(\\d+)', {status})[1]) * 1024)"
    imports = "from aimv2_mlx.train.export import export\n"
    work = f"export({str(scratch / 'L')!r}, {str(scratch / 'out')!r}, {fmt!r})\n"
    base, used = (
        int(
            subprocess.run(
                [sys.executable, "-c", imports + code + peak],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for code in ("", work)
    )
    print(
        f"\n{fmt}: {size / 1e6:.0f} MB model; peak {used / 1e6:.0f} MB, imports {base / 1e6:.0f} MB"
    )
    assert abs((scratch / "out" / "model.safetensors").stat().st_size - size) < 10**5
    assert used - base < size / 8


# --- LiT ---------------------------------------------------------------------------------------


def _tiny_lit(folder: Path) -> mx.array:
    """Our LiT, random everywhere (positions and logit scale too), with a CLIP vocabulary."""
    vocab = write_vocab(folder)
    config = ModelConfig(
        name="tiny-lit",
        vision=EncoderConfig(64, 2, 2, 128, image_size=56, use_head=True),
        text=TextConfig(
            vocab_size=len(vocab),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=16,
            eos_token_id=len(vocab) - 1,
        ),
        projection_dim=32,
        preprocess=PreprocessConfig.for_mode("clip", 56),
    )
    mx.random.seed(0)
    model = aimv2_mlx.build(config)
    model.load_weights(
        [
            ("text_encoder.preprocessor.positional_embedding", 0.02 * mx.random.normal((16, 64))),
            ("log_logit_scale", mx.array(2.5)),
        ],
        strict=False,
    )
    aimv2_mlx.save(model, folder)
    return model


def test_a_lit_model_exported_for_transformers_gives_our_logits(tmp_path, transformers_reference):
    """transformers' side: `Aimv2Model`, the image processor and the tokenizer from the export."""

    from aimv2_mlx.tokenizer import text_tokenizer

    import torch
    from transformers import Aimv2Model, AutoTokenizer

    _tiny_lit(tmp_path / "lit")
    export(tmp_path / "lit", tmp_path / "hf", "transformers")
    reference = _load_strictly(Aimv2Model, tmp_path / "hf", attn_implementation="eager")
    ours = aimv2_mlx.load(tmp_path / "lit")
    pixels = _hub_pixels(tmp_path / "hf", _photos())
    captions = ["a photo of a cat.", "a rocket", "coffee", "an astronaut in space"]
    hub_ids = AutoTokenizer.from_pretrained(tmp_path / "hf")(
        captions, padding="max_length", max_length=16, return_tensors="pt"
    )["input_ids"]
    with torch.inference_mode():
        expected = reference(
            input_ids=hub_ids,
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            attention_mask=torch.ones(hub_ids.shape, dtype=torch.long),  # the text tower causal
        ).logits_per_image.numpy()
    ids = text_tokenizer(tmp_path / "lit").encode(captions, context_length=16)
    per_image, _ = ours.logits(mx.array(pixels), mx.array(ids))
    assert expected.std() > 0.1  # the comparison could see a wrong image or caption order
    assert np.abs(np.array(per_image) - expected).max() <= TOL


def test_a_lit_model_without_tokenizer_files_is_refused_in_one_line(tmp_path):
    _tiny_lit(tmp_path / "lit")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "lit" / name).unlink()
    result = run_cli("export", tmp_path / "lit", tmp_path / "out", "--format", "transformers")
    one_line_error(result, str(tmp_path / "lit"), "tokenizer files")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lit"]  # nothing half-written left


# --- ml-aim and the round trip ---------------------------------------------------------------


def test_ml_aim_export_equals_the_convert_tests_hand_written_rewrite(
    tmp_path, transformers_reference
):
    _hf_vision(
        tmp_path / "hf",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=56,
    )
    convert(tmp_path / "hf", tmp_path / "ours")
    export(tmp_path / "ours", tmp_path / "ml-aim", "ml-aim")
    expected = _ml_aim_state(
        _read_safetensors(tmp_path / "hf" / "model.safetensors"), channels_last=False
    )
    got = _read_safetensors(tmp_path / "ml-aim" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        assert np.array_equal(got[key], value), key


def _round_trip(source: Path, fmt: str, root: Path) -> None:
    export(source, root / fmt, fmt)
    convert(root / fmt, root / f"{fmt}-back")
    back, ours = aimv2_mlx.load(root / f"{fmt}-back").config, aimv2_mlx.load(source).config
    assert (back.vision, back.text) == (ours.vision, ours.text)  # text: its EOS and pad ids too
    before = mx.load(str(source / "model.safetensors"))
    after = mx.load(str(root / f"{fmt}-back" / "model.safetensors"))
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert value.dtype == after[key].dtype == mx.float32, key
        assert np.array_equal(np.array(value), np.array(after[key])), key


@pytest.mark.parametrize("fmt", ["transformers", "ml-aim"])
def test_export_then_convert_gives_back_every_float32_bit(tmp_path, fmt):
    mx.random.seed(1)
    aimv2_mlx.save(aimv2_mlx.build(tiny_config(head=True, depth=3)), tmp_path / "src")
    _round_trip(tmp_path / "src", fmt, tmp_path)


def test_a_lit_export_then_convert_gives_back_every_float32_bit(tmp_path):
    _tiny_lit(tmp_path / "lit")
    _round_trip(tmp_path / "lit", "transformers", tmp_path)


def test_the_writer_reads_each_of_our_tensors_once_even_when_it_splits_it(tmp_path):
    mx.random.seed(0)
    aimv2_mlx.save(aimv2_mlx.build(tiny_config()), tmp_path / "src")
    checkpoint = open_checkpoint(tmp_path / "src")
    reads = dict.fromkeys(checkpoint.tensors, 0)
    for key, ref in checkpoint.tensors.items():
        ref.read = lambda key=key, read=ref.read: (reads.__setitem__(key, reads[key] + 1), read())[
            1
        ]
    foreign = foreign_plan(checkpoint, "transformers")
    assert sum(item.recipe.op == "qkv" for item in foreign) == 3 * 2  # q, k, v of 2 blocks
    write_tensors(checkpoint, foreign, tmp_path / "model.safetensors")
    assert set(reads.values()) == {1}


# --- the command, the card, the hub ---------------------------------------------------------------


def test_an_unknown_format_or_a_foreign_folder_is_refused_in_one_line(tmp_path):
    aimv2_mlx.save(aimv2_mlx.build(tiny_config()), tmp_path / "src")
    one_line_error(
        run_cli("export", tmp_path / "src", tmp_path / "out", "--format", "onnx"),
        "--format onnx",
        "transformers",
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "aimv2"}))
    one_line_error(
        run_cli("export", tmp_path / "other", tmp_path / "out", "--format", "ml-aim"),
        str(tmp_path / "other"),
        "aimv2 convert",
    )
    assert not (tmp_path / "out").exists()


def test_an_ml_aim_file_convert_would_misread_is_refused(tmp_path):
    """Patch 2 with 3 channels: (O, 3, 2, 2) reads as channels-last, so it is not written."""
    config = tiny_config()
    config.vision = EncoderConfig(32, 1, 2, 64, patch_size=2, image_size=8)
    aimv2_mlx.save(aimv2_mlx.build(config), tmp_path / "src")
    result = run_cli("export", tmp_path / "src", tmp_path / "out", "--format", "ml-aim")
    one_line_error(result, str(tmp_path / "src"), "would not be read back")
    assert not (tmp_path / "out").exists()
    _round_trip(tmp_path / "src", "transformers", tmp_path)  # unambiguous there


def test_a_quantized_model_is_refused_for_pytorch_formats_and_kept_quantized_for_mlx(tmp_path):
    aimv2_mlx.save(aimv2_mlx.build(tiny_config()), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "q8", q_bits=8, q_group_size=32)
    one_line_error(
        run_cli("export", tmp_path / "q8", tmp_path / "out", "--format", "transformers"),
        "quantized",
    )
    assert not (tmp_path / "out").exists()
    export(tmp_path / "q8", tmp_path / "mlx")
    before = mx.load(str(tmp_path / "q8" / "model.safetensors"))
    after = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(np.array_equal(np.array(before[k]), np.array(after[k])) for k in before)
    assert aimv2_mlx.load(tmp_path / "mlx").config.quantization["bits"] == 8


@pytest.mark.parametrize(
    "origin, licence",
    [
        ("hf://apple/aimv2-3B-patch14-448", "apple-amlr"),
        ("hf://apple/aimv2-1B-patch14-224", "apple-amlr"),
        ("hf://apple/aimv2-large-patch14-224-lit", "apple-amlr"),
        ("hf://apple/aimv2-large-patch14-336", "apple-ascl"),
        ("aimv2 pretrain", "mit"),
        ("/some/folder", "other"),
    ],
)
def test_the_card_states_the_licence_of_where_the_weights_came_from(origin, licence):
    config = tiny_config()
    config.source = {"origin": origin}
    assert licence_of(config)[0] == licence


def test_a_model_tuned_from_apple_weights_keeps_their_licence():
    config = tiny_config()
    config.source = {
        "origin": "aimv2 lit",
        "image_tower": {"origin": "hf://apple/aimv2-large-patch14-224"},
    }
    assert licence_of(config)[0] == "apple-ascl"
    config.source["text_tower"] = ["hf://apple/aimv2-3B-patch14-224"]
    assert licence_of(config)[0] == "apple-amlr"  # the most restrictive of its sources
    config.source = {"origin": "aimv2 pretrain", "init_from": "/cluster/ml-l3m/checkpoint.pt"}
    assert licence_of(config)[0] == "other"


def test_the_card_of_a_lit_run_says_what_was_tuned_against_which_encoder():
    config = tiny_config()
    config.source = {
        "origin": "aimv2 lit",
        "encoder_identity": {"name": "my-encoder", "origin": "aimv2 pretrain"},
        "data": "shapes",
        "step": 20,
        "samples_seen": 640,
        "loss": "softmax",
        "trained": "text tower",
    }
    made = how_made(config)
    assert "`aimv2 lit`" in made and "20 steps, 640 pairs on `shapes`" in made
    assert "locked image encoder `my-encoder`" in made and "Pre-trained" not in made
    assert licence_of(config)[0] == "mit"  # an encoder pre-trained here, a tower tuned here
    config.source["encoder_identity"] = {
        "name": "x",
        "origin": "hf://apple/aimv2-large-patch14-224",
    }
    assert licence_of(config)[0] == "apple-ascl"


def test_upload_sends_the_exported_folder(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    aimv2_mlx.save(aimv2_mlx.build(tiny_config()), tmp_path / "src")
    result = export(
        tmp_path / "src", tmp_path / "out", "transformers", upload_repo="someone/aimv2-tiny"
    )
    assert result.uploaded_to == "someone/aimv2-tiny"
    assert calls == [
        ("create_repo", "someone/aimv2-tiny"),
        ("upload_folder", "someone/aimv2-tiny", str(tmp_path / "out")),
    ]


def test_the_readme_pytorch_lines_load_an_export(tmp_path, transformers_reference, monkeypatch):
    """README "Use it in PyTorch": its export command and its two Python lines, as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Use it in PyTorch", 1)[1].split("\n### ", 1)[0]
    shell, python = [block.split("\n", 1)[1] for block in section.split("```")[1:4:2]]
    command = shell.split("#")[0].split()
    assert command[:2] == ["aimv2", "export"] and "--format" in command
    mx.random.seed(0)
    aimv2_mlx.save(aimv2_mlx.build(tiny_config()), tmp_path / command[2].rstrip("/"))
    monkeypatch.chdir(tmp_path)
    assert run_cli(*command[1:]).exit_code == 0
    namespace = {}
    exec(python, namespace)
    assert type(namespace["model"]).__name__ == "Aimv2VisionModel"
    assert len([line for line in python.splitlines() if line.strip()]) == 2
