"""Text queries through a tiny random LiT rank images as transformers' `Aimv2Model` does on the
same weights: the text embeddings search compares with."""

from __future__ import annotations

from pathlib import Path

import aimv2_mlx
from aimv2_mlx.text_embed import embed_texts, trim_padding

import numpy as np
from PIL import Image, ImageOps

from .conftest import save_tiny_lit

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "photos").glob("*.jpg"))
QUERIES = ["a photo of a cat.", "a rocket", "coffee cup on a table", "an astronaut in space", "dog"]
CONTEXT = 16


def test_text_search_through_a_tiny_lit_ranks_images_as_transformers_does(
    tmp_path, transformers_reference
):
    import torch

    reference = save_tiny_lit(tmp_path, transformers_reference, seed=1, context=CONTEXT)
    model = aimv2_mlx.load(tmp_path)
    images = [Image.open(p).convert("RGB") for p in PHOTOS]
    images += [ImageOps.mirror(image) for image in images] + [image.rotate(90) for image in images]
    vectors = aimv2_mlx.embed(images, model, pool="head", normalize=True)  # what an index holds
    scores = np.array(embed_texts(model, QUERIES)) @ vectors.T
    ours = np.argsort(-scores, axis=1, kind="stable")

    hf_tokenizer = transformers_reference.CLIPTokenizer.from_pretrained(tmp_path)
    ids = hf_tokenizer(QUERIES, padding="max_length", max_length=CONTEXT, return_tensors="pt")
    pixels = torch.from_numpy(np.array(aimv2_mlx.preprocess(images, model))).permute(0, 3, 1, 2)
    with torch.inference_mode():
        out = reference(
            input_ids=ids["input_ids"],
            pixel_values=pixels,
            attention_mask=torch.ones_like(ids["input_ids"]),
        )  # causal text tower
        cosine = (out.logits_per_text / reference.logit_scale.exp()).numpy()
    assert np.abs(scores - cosine).max() <= 1e-4
    expected = np.argsort(-cosine, axis=1, kind="stable")
    gaps = np.diff(np.sort(-cosine, axis=1), axis=1)
    assert gaps.min() > 2e-4  # no near-ties, so the rankings are comparable exactly
    np.testing.assert_array_equal(ours, expected)
    assert len({tuple(row[:3]) for row in ours}) > 1  # the queries rank the images differently


def test_trimming_padding_keeps_every_text_whole():
    ids = np.array([[5, 1, 2, 9, 0, 0, 0, 0, 0, 0], [5, 9, 0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(trim_padding(ids, 9), ids[:, :4])
    np.testing.assert_array_equal(trim_padding(ids, 9, multiple=8), ids[:, :8])
    np.testing.assert_array_equal(trim_padding(ids, 9, multiple=16), ids)
