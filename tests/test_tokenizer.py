"""CLIP BPE ids against transformers' CLIPTokenizer and OpenAI's pure-Python BPE, same
vocabulary.
"""

from __future__ import annotations

from aimv2_mlx.tokenizer import text_tokenizer

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
    tokenizer = text_tokenizer(vocab_folder)
    size = tokenizer.vocab_size
    assert (tokenizer.bos_id, tokenizer.eos_id) == (size - 2, size - 1)
    ids = tokenizer.token_ids("a photo of a cat")
    # one id per word: "photo", "of" are merged tokens
    assert len(ids) == 5 and min(ids[1:3]) >= 512
    assert ids[0] == ids[3] == 320  # "a</w>", the id it has in CLIP's real vocabulary too


@pytest.mark.parametrize("text", TEXTS + [LONG])
def test_ids_match_openai_bpe(vocab_folder, text):
    assert text_tokenizer(vocab_folder).token_ids(text) == reference_ids(text, vocab_folder)


def test_final_sigma_follows_transformers_not_python_lower(vocab_folder, hf_tokenizer):
    """The one known difference: `tokenizers` lower-cases a final Σ to σ, Python's lower() to ς."""
    ours = text_tokenizer(vocab_folder).token_ids(FINAL_SIGMA)
    assert ours == hf_tokenizer(FINAL_SIGMA, add_special_tokens=False)["input_ids"]
    assert ours != reference_ids(FINAL_SIGMA, vocab_folder)


def test_batch_matches_transformers(vocab_folder, hf_tokenizer):
    texts = TEXTS + [LONG, FINAL_SIGMA]
    for context in (77, 16):
        ours = text_tokenizer(vocab_folder).encode(texts, context_length=context)
        theirs = hf_tokenizer(
            texts, padding="max_length", truncation=True, max_length=context, return_tensors="np"
        )
        assert ours.dtype == np.int32 and ours.shape == (len(texts), context)
        mask = theirs["attention_mask"].astype(bool)
        # transformers pads with the end token, we pad with zeros (OpenAI's CLIP): compare the rest.
        assert (ours[mask] == theirs["input_ids"][mask]).all()
        assert (ours[~mask] == 0).all()


def test_truncation_keeps_start_and_end(vocab_folder):
    tokenizer = text_tokenizer(vocab_folder)
    full = tokenizer.token_ids(LONG)
    row = tokenizer.encode(LONG, context_length=16)[0]
    assert len(full) > 16
    assert row.tolist() == [tokenizer.bos_id, *full[:14], tokenizer.eos_id]
    x = tokenizer.token_ids("x")
    assert tokenizer.encode(["x"], context_length=8)[0].tolist() == [
        tokenizer.bos_id,
        *x,
        tokenizer.eos_id,
    ] + [0] * (6 - len(x))


def test_tokenizer_json_is_used_when_present(vocab_folder, hf_tokenizer, tmp_path):
    hf_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_json = text_tokenizer(tmp_path)
    from_files = text_tokenizer(vocab_folder)
    texts = TEXTS + [LONG, FINAL_SIGMA]
    assert (from_json.encode(texts) == from_files.encode(texts)).all()


def test_missing_or_foreign_vocabulary_is_a_clear_error(vocab_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        text_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(
        ValueError, match=f"lacks {START.replace('|', '.')} or {END.replace('|', '.')}"
    ):
        text_tokenizer(tmp_path)
