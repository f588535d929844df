"""Zero-shot classification end to end against transformers' `Aimv2Model` on a tiny random LiT.

The reference is saved with `save_pretrained`, our test vocabulary is written beside it, and
`aimv2_mlx.load` reads the folder as a user's download; the reference tokenizes with
transformers' `CLIPTokenizer`, we with our own.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.zeroshot import ZeroShotClassifier

import mlx.core as mx
import numpy as np
import pytest
from scipy.special import softmax

from .conftest import save_tiny_lit, tiny_config

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"
LABELS = ["cat", "rocket", "coffee cup", "astronaut", "dog"]
CONTEXT = 16
TOL = 1e-4


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    """(folder, transformers reference, our model, transformers' tokenizer) for a tiny random
    LiT.
    """
    pytest.importorskip(
        "torch", reason="zero-shot parity needs the test extra: pip install -e '.[test]'"
    )
    transformers = pytest.importorskip(
        "transformers", reason="zero-shot parity needs transformers>=5"
    )

    folder = tmp_path_factory.mktemp("tiny-lit")
    reference = save_tiny_lit(folder, transformers, context=CONTEXT, logit_scale=2.5)
    return (
        folder,
        reference,
        aimv2_mlx.load(folder),
        transformers.CLIPTokenizer.from_pretrained(folder),
    )


def _reference(lit, prompts: list[str], pixels: mx.array):
    import torch

    _, reference, _, hf_tokenizer = lit
    ids = hf_tokenizer(
        prompts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt"
    )
    with torch.inference_mode():
        return reference(
            input_ids=ids["input_ids"],
            pixel_values=torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2),
            # makes the text tower causal
            attention_mask=torch.ones_like(ids["input_ids"]),
        )


def test_single_template_logits_and_probabilities_match_transformers(lit):
    _, _, model, _ = lit
    photos = sorted(PHOTOS.glob("*.jpg"))
    pixels = aimv2_mlx.preprocess(photos, model)
    assert pixels.shape == (len(photos), 56, 56, 3)
    expected = _reference(
        lit, [f"a photo of a {label}." for label in LABELS], pixels
    ).logits_per_image.numpy()

    classifier = ZeroShotClassifier(model, LABELS, ["a photo of a {}."])
    logits = classifier.logits(pixels)
    assert np.abs(logits - expected).max() <= TOL
    assert expected.std() > 0.1  # the test could see a wrong class or image order
    probabilities = aimv2_mlx.zero_shot(
        photos, model, LABELS, templates=["a photo of a {}."], batch_size=3
    )
    assert probabilities.shape == (len(photos), len(LABELS))
    assert np.abs(probabilities - softmax(expected, axis=-1)).max() <= 1e-5


def test_template_ensemble_matches_transformers_text_embeddings(lit):
    _, reference, model, _ = lit
    templates = ["a photo of a {}.", "art of the {}.", "itap of a {}!"]
    photos = sorted(PHOTOS.glob("*.jpg"))
    pixels = aimv2_mlx.preprocess(photos, model)
    out = _reference(lit, [t.format(label) for label in LABELS for t in templates], pixels)
    text = out.text_embeds.numpy().reshape(len(LABELS), len(templates), -1).mean(axis=1)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    expected = softmax(
        reference.logit_scale.exp().item() * out.image_embeds.numpy() @ text.T, axis=-1
    )

    probabilities = aimv2_mlx.zero_shot(pixels, model, LABELS, templates=templates, batch_size=2)
    assert np.abs(probabilities - expected).max() <= 1e-5
    single = aimv2_mlx.zero_shot(pixels, model, LABELS, templates=templates[:1])
    assert np.abs(single - probabilities).max() > 1e-4  # the ensemble changes the answer


def test_bad_model_labels_and_templates_are_clear_errors(lit, tmp_path):
    folder, _, model, _ = lit
    with pytest.raises(ValueError, match="not a LiT model"):
        ZeroShotClassifier(aimv2_mlx.build(tiny_config()), LABELS)
    with pytest.raises(ValueError, match="more than once: cat"):
        ZeroShotClassifier(model, ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="at least one label"):
        ZeroShotClassifier(model, [])
    for template in ("a photo", "a {} and a {}", "a {label}"):
        with pytest.raises(ValueError, match="exactly one"):
            ZeroShotClassifier(model, LABELS, [template])
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("vocab.json", "merges.txt"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        ZeroShotClassifier(aimv2_mlx.load(bare), LABELS)


def _aimv2(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", *args], capture_output=True, text=True, env=env
    )


def test_cli_zero_shot_text_json_and_csv(lit, tmp_path):
    folder, _, model, _ = lit
    images = tmp_path / "images"
    shutil.copytree(PHOTOS, images)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    result = _aimv2(
        "classify",
        str(images),
        "--zero-shot",
        ", ".join(LABELS),
        "-m",
        str(folder),
        "--top-k",
        "2",
        "-o",
        str(tmp_path / "top.csv"),
        cache=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    lines = result.stdout.strip().splitlines()
    photos = sorted(str(p) for p in images.glob("*.jpg") if p.name != "broken.jpg")
    assert [line for line in lines if not line.startswith("  ")] == photos
    assert len(lines) == len(photos) * 3

    expected = aimv2_mlx.zero_shot(photos, model, LABELS)  # the default templates
    rows = list(csv.DictReader((tmp_path / "top.csv").read_text().splitlines()))
    assert len(rows) == 2 * len(photos)
    for i, photo in enumerate(photos):
        order = expected[i].argsort()[::-1][:2]
        mine = [row for row in rows if row["image"] == photo]
        assert [row["label"] for row in mine] == [LABELS[j] for j in order]
        assert np.allclose(
            [float(row["probability"]) for row in mine], expected[i][order], atol=1e-5
        )
        assert lines[3 * i + 1].split(None, 1) == [f"{expected[i][order[0]]:.4f}", LABELS[order[0]]]

    labels_file, templates_file = tmp_path / "labels.txt", tmp_path / "templates.txt"
    labels_file.write_text("\n".join(LABELS) + "\n\n")
    templates_file.write_text("a photo of a {}.\nart of the {}.\n")
    result = _aimv2(
        "classify",
        *photos[:2],
        "--labels-file",
        str(labels_file),
        "--templates",
        str(templates_file),
        "-m",
        str(folder),
        "--json",
        "--top-k",
        "9",
        cache=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    expected = aimv2_mlx.zero_shot(
        photos[:2], model, LABELS, templates=["a photo of a {}.", "art of the {}."]
    )
    assert summary["labels"] == LABELS and summary["skipped"] == []
    for i, entry in enumerate(summary["results"]):
        assert entry["image"] == photos[i] and len(entry["top"]) == len(LABELS)
        got = {top["label"]: top["probability"] for top in entry["top"]}
        assert np.allclose([got[label] for label in LABELS], expected[i], atol=1e-6)
        assert [top["probability"] for top in entry["top"]] == sorted(got.values(), reverse=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "ENCODER", "--zero-shot", "cat,dog"], "not a LiT model"),
        (["--zero-shot", " , "], "no class names"),
        ([], "no class names"),
        (["--labels-file", "missing.txt"], "missing.txt: no such file"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    encoder = aimv2_mlx.save(aimv2_mlx.build(tiny_config()), tmp_path / "encoder")  # no text tower
    args = [str(encoder) if arg == "ENCODER" else arg for arg in args]
    result = _aimv2("classify", str(PHOTOS / "chelsea.jpg"), *args, cache=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and result.stderr.strip().count("\n") == 0
    assert message in result.stderr
