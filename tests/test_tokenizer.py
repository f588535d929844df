"""CLIP BPE ids against transformers' CLIPTokenizer and OpenAI's pure-Python BPE, same
vocabulary.
"""

from __future__ import annotations

from aimv2_mlx.tokenizer import ClipTokenizer

import numpy as np
import pytest

from .clip_bpe import END, START, reference_ids, write_vocab

TEXTS = [
    "a photo of a cat.",
    "A Photo Of A CAT",
    "a photo of the large dog!",
    "It's a lovely day, isn't it? We'll see; they're sure you've heard what I'd said and I'm done.",
    "THE ASTRONAUT'S HELMET",
    "rock'n'roll",
    "'s 't 're 've 'm 'll 'd",
    "the rocket launched at 10:42 on 2024-06-01",
    "3.14159 and 1,000,000 and 007",
    "   leading, trailing   and   repeated   spaces   ",
    "tabs\tand\nnewlines\r\nand\u00a0no-break\u3000ideographic spaces",
    "punctuation!!! ?!? ... ,,, ;; -- (brackets) [square] {curly} <angle>",
    "email@example.com #hashtag $5 100% a&b a/b a\\b ~tilde^caret_underscore`",
    "café naïve résumé Ünïcödé ĲSSELMEER straße",
    "cafe\u0301 (decomposed é composes under NFC)",
    "Ελληνικά кошка собака",
    "猫と犬 고양이 القطة 🐱🐶 😀😀😀",
    "नमस्ते दुनिया",
    "emoji👍inside words and ✓ marks",
    "",
    "   ",
    "x",
    "<|endoftext|> inside <|startoftext|> text",
    "tokenizer's 'quotes' and \"double quotes\" and `backticks`",
    "zero-shot classification labels: cat, dog, car, coffee, rocket, astronaut, tree, house, "
    "person",
    "A bad photo of the CAT; art of the DOG, itap of a bird!",
]
LONG = "the quick brown fox jumps over the lazy dog " * 20
FINAL_SIGMA = "ΟΔΟΣ"


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-vocab")
    write_vocab(folder)
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_folder):
    pytest.importorskip(
        "transformers", reason="tokenizer parity needs transformers>=5 (test extra)"
    )
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(vocab_folder)


def test_vocabulary_is_clip_shaped_and_merges_are_used(vocab_folder):
    tokenizer = ClipTokenizer.from_folder(vocab_folder)
    size = tokenizer.backend.get_vocab_size()
    assert (tokenizer.start_id, tokenizer.end_id) == (size - 2, size - 1)
    ids = tokenizer.encode("a photo of a cat")
    # one id per word: "photo", "of" are merged tokens
    assert len(ids) == 5 and min(ids[1:3]) >= 512
    assert ids[0] == ids[3] == 320  # "a</w>", the id it has in CLIP's real vocabulary too


@pytest.mark.parametrize("text", TEXTS + [LONG])
def test_ids_match_openai_bpe(vocab_folder, text):
    assert ClipTokenizer.from_folder(vocab_folder).encode(text) == reference_ids(text, vocab_folder)


def test_final_sigma_follows_transformers_not_python_lower(vocab_folder, hf_tokenizer):
    """The one known difference: `tokenizers` lower-cases a final Σ to σ, Python's str.lower to
    ς.
    """
    ours = ClipTokenizer.from_folder(vocab_folder).encode(FINAL_SIGMA)
    assert ours == hf_tokenizer(FINAL_SIGMA, add_special_tokens=False)["input_ids"]
    assert ours != reference_ids(FINAL_SIGMA, vocab_folder)


def test_batch_matches_transformers(vocab_folder, hf_tokenizer):
    texts = TEXTS + [LONG, FINAL_SIGMA]
    for context in (77, 16):
        ours = ClipTokenizer.from_folder(vocab_folder)(texts, context_length=context)
        theirs = hf_tokenizer(
            texts, padding="max_length", truncation=True, max_length=context, return_tensors="np"
        )
        assert ours.dtype == np.int32 and ours.shape == (len(texts), context)
        mask = theirs["attention_mask"].astype(bool)
        # transformers pads with the end token, we pad with zeros (OpenAI's CLIP): compare the rest.
        assert (ours[mask] == theirs["input_ids"][mask]).all()
        assert (ours[~mask] == 0).all()


def test_truncation_keeps_start_and_end(vocab_folder):
    tokenizer = ClipTokenizer.from_folder(vocab_folder)
    full = tokenizer.encode(LONG)
    row = tokenizer(LONG, context_length=16)[0]
    assert len(full) > 16
    assert row.tolist() == [tokenizer.start_id, *full[:14], tokenizer.end_id]
    x = tokenizer.encode("x")
    assert tokenizer(["x"], context_length=8)[0].tolist() == [
        tokenizer.start_id,
        *x,
        tokenizer.end_id,
    ] + [0] * (6 - len(x))


def test_tokenizer_json_is_used_when_present(vocab_folder, hf_tokenizer, tmp_path):
    hf_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_json = ClipTokenizer.from_folder(tmp_path)
    from_files = ClipTokenizer.from_folder(vocab_folder)
    texts = TEXTS + [LONG, FINAL_SIGMA]
    assert (from_json(texts) == from_files(texts)).all()


def test_missing_or_foreign_vocabulary_is_a_clear_error(vocab_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(
        ValueError, match=f"lacks {START.replace('|', '.')} or {END.replace('|', '.')}"
    ):
        ClipTokenizer.from_folder(tmp_path)
