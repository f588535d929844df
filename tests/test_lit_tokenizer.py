"""`aimv2 lit --tokenizer` with any Hugging Face tokenizer.json (a Unigram one built here, as
SigLIP's sentencepiece conversion is): its own EOS and pad ids drive the run, are recorded in the
LiT config, and `load()`, zero-shot, search and the transformers export all use them."""

from __future__ import annotations

import json

import aimv2_mlx
from aimv2_mlx.convert import convert
from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.errors import Aimv2Error
from aimv2_mlx.lit_tuning import lit_tune
from aimv2_mlx.search import text_vector
from aimv2_mlx.tokenizer import load_tokenizer, normalize_caption, text_tokenizer
from aimv2_mlx.train.export import export
from aimv2_mlx.vectors import l2_normalize
from aimv2_mlx.zeroshot import ZeroShotClassifier

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from .clip_bpe import write_vocab
from .conftest import one_line_error, run_cli
from .test_caption_tokenizer import unigram_tokenizer_json
from .test_export import TOL, _hub_pixels, _load_strictly
from .test_lit_tuning import quiet, tiny

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
CONTEXT = 16
EOS, PAD = 1, 0  # the Unigram file's </s> and <pad>, not CLIP's ids


def test_a_unigram_tokenizer_json_drives_aimv2_lit_and_its_export_matches_transformers(
    tmp_path, transformers_reference
):
    import torch
    from transformers import Aimv2Model, AutoTokenizer

    data = write_shapes(tmp_path / "data", 16, size=56)
    captions = load_captioned(data).captions()
    (tmp_path / "unigram").mkdir()
    unigram = unigram_tokenizer_json(tmp_path / "unigram" / "tokenizer.json", captions)
    run = tmp_path / "run"
    args = ["lit", data, "-o", run, "--tokenizer", unigram, "--steps", 3, "-b", 8]
    args += ["--text-width", 32, "--text-depth", 1, "--text-heads", 2, "--projection-dim", 32]
    args += ["--context-length", CONTEXT, "--warmup-steps", 1, "--log-every", 1, "--no-compile"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "config.json").read_text())["text"]
    vocab = Tokenizer.from_file(str(unigram)).get_vocab_size()
    assert (recorded["eos_token_id"], recorded["pad_token_id"], recorded["vocab_size"]) == (
        EOS,
        PAD,
        vocab,
    )
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite(r["loss"]) for r in log)
    resumed = run_cli("lit", data, "-o", run, "--resume", "--steps", 4)
    assert resumed.exit_code == 0, resumed.output

    # The exported model tokenizes as pretrain reads the same file: no BOS, EOS 1, then pad 0.
    assert run_cli("export", run, tmp_path / "lit").exit_code == 0
    model = aimv2_mlx.load(tmp_path / "lit")
    assert (model.config.text.eos_token_id, model.config.text.pad_token_id) == (EOS, PAD)
    prompts = [f"a {c}" for c in COLORS]
    expected_ids = load_tokenizer(unigram, CONTEXT).encode(prompts)
    classifier = ZeroShotClassifier(model, COLORS, ["a {}"])
    np.testing.assert_array_equal(classifier.tokenizer.encode(prompts), expected_ids)
    for row in expected_ids.tolist():
        end = row.index(EOS)
        assert end > 0 and set(row[end + 1 :]) == {PAD} and PAD not in row[:end]

    # The text tower pools at EOS: what follows it changes nothing, the token before it does.
    ids = expected_ids.copy()
    after = np.arange(CONTEXT)[None, :] > (ids == EOS).argmax(1)[:, None]
    noisy = np.where(after, np.random.default_rng(0).integers(3, vocab, ids.shape), ids)
    np.testing.assert_allclose(
        np.array(model.encode_text(mx.array(noisy))),
        np.array(model.encode_text(mx.array(ids))),
        atol=1e-5,
    )
    changed = ids.copy()
    changed[0, (ids[0] == EOS).argmax() - 1] = 2
    first, other = (np.array(model.encode_text(mx.array(x[:1]))) for x in (ids, changed))
    assert not np.allclose(first, other)

    # Zero-shot and search equal the brute force on those ids.
    images = sorted((data / "images").glob("*.png"))[:4]
    image = l2_normalize(model.encode_image(aimv2_mlx.preprocess(images, model)))
    text = l2_normalize(model.encode_text(mx.array(expected_ids)))
    logits = np.array(model.logit_scale() * image @ text.T)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(
        classifier(images), probabilities / probabilities.sum(1, keepdims=True), atol=1e-5
    )
    np.testing.assert_allclose(text_vector(model, "a red"), np.array(text[0]), atol=1e-5)
    result = run_cli("classify", *images, "-m", tmp_path / "lit", "--zero-shot", ",".join(COLORS))
    assert result.exit_code == 0, result.output

    # transformers: `Aimv2Model` and `AutoTokenizer` from the export give our ids and logits.
    export(tmp_path / "lit", tmp_path / "hf", "transformers")
    reference = _load_strictly(Aimv2Model, tmp_path / "hf", attn_implementation="eager")
    texts = [normalize_caption(c) for c in captions[:4]] + prompts[:2]
    hub_ids = AutoTokenizer.from_pretrained(tmp_path / "hf")(
        texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt"
    )["input_ids"]
    ours_ids = text_tokenizer(tmp_path / "lit", CONTEXT, EOS, PAD).encode(texts)
    np.testing.assert_array_equal(hub_ids.numpy(), ours_ids)
    pixels = _hub_pixels(tmp_path / "hf", [Image.open(p).convert("RGB") for p in images])
    with torch.inference_mode():
        expected = reference(
            input_ids=hub_ids,
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            attention_mask=torch.ones(hub_ids.shape, dtype=torch.long),  # the text tower causal
        ).logits_per_image.numpy()
    per_image, _ = model.logits(mx.array(pixels), mx.array(ours_ids))
    assert expected.std() > 0.01  # the comparison could see a wrong image or caption order
    assert np.abs(np.array(per_image) - expected).max() <= TOL

    # Converted back from transformers' layout, the model keeps its ids.
    convert(tmp_path / "hf", tmp_path / "back")
    back = aimv2_mlx.load(tmp_path / "back")
    assert (back.config.text.eos_token_id, back.config.text.pad_token_id) == (EOS, PAD)
    again = ZeroShotClassifier(back, COLORS, ["a {}"]).tokenizer.encode(prompts)
    np.testing.assert_array_equal(again, expected_ids)


def test_a_tokenizer_that_ends_texts_otherwise_than_the_config_is_refused_naming_it(tmp_path):
    (tmp_path / "lit").mkdir()
    unigram = unigram_tokenizer_json(tmp_path / "lit" / "tokenizer.json")
    assert text_tokenizer(tmp_path / "lit", CONTEXT, EOS, PAD).eos_id == EOS
    for eos, pad, needle in ((2, PAD, "text.eos_token_id 2"), (EOS, 2, "text.pad_token_id 2")):
        with pytest.raises(Aimv2Error) as refused:
            text_tokenizer(tmp_path / "lit", CONTEXT, eos, pad)
        assert str(unigram) in str(refused.value) and needle in str(refused.value)
    data = write_shapes(tmp_path / "data", 4, size=56)
    result = run_cli("lit", data, "-o", tmp_path / "run", "--tokenizer", tmp_path / "nowhere")
    one_line_error(result, str(tmp_path / "nowhere"), "no tokenizer files")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the run was made


def test_a_clip_tokenizer_json_given_by_its_path_still_tokenizes_the_run_the_clip_way(
    tmp_path, transformers_reference
):
    write_vocab(tmp_path / "clip")
    clip = transformers_reference.CLIPTokenizer.from_pretrained(tmp_path / "clip")
    clip.backend_tokenizer.save(str(tmp_path / "clip.json"))
    data = write_shapes(tmp_path / "data", 16, size=56)
    config = tiny(steps=1, warmup_steps=0)
    lit_tune(data, tmp_path / "run", config, tokenizer=tmp_path / "clip.json", echo=quiet)
    assert sorted(p.name for p in (tmp_path / "run" / "tokenizer").iterdir()) == ["tokenizer.json"]
    run_tok = text_tokenizer(tmp_path / "run" / "tokenizer")
    files_tok = text_tokenizer(tmp_path / "clip")
    text = json.loads((tmp_path / "run" / "config.json").read_text())["text"]
    assert (text["eos_token_id"], text["pad_token_id"]) == (files_tok.eos_id, 0)
    assert run_tok.bos_id == files_tok.bos_id == files_tok.vocab_size - 2
    texts = [f"A {c} circle, left of: a square!" for c in COLORS]
    np.testing.assert_array_equal(run_tok.encode(texts, CONTEXT), files_tok.encode(texts, CONTEXT))
