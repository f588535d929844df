"""Caption tokenizers from the PyTorch world: any Hugging Face tokenizer.json (a Unigram one built
here, as sentencepiece conversions such as SigLIP's are), its EOS and pad ids, and ml-l3m's caption
normalisation, EOS and padding, checked against ml-l3m's code and transformers' tokenizer calls."""

from __future__ import annotations

import html
import json
import re
import string
from pathlib import Path

from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.objective import text_count
from aimv2_mlx.tokenizer import CaptionTokenizer, load_tokenizer, normalize_caption, train_tokenizer
from aimv2_mlx.train.batches import BatchPlan
from aimv2_mlx.train.config import PretrainConfig

import numpy as np
import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from .conftest import run_cli

TRICKY = [
    "A Photo, of: the CAT!!!",
    "  leading,   trailing\tand\nrepeated   whitespace  ",
    "café NAÏVE Straße ĲSSEL",
    "cafe\u0301 decomposed",
    "“curly quotes” and ‘single’ and «guillemets»",
    "&amp;amp; html &lt;b&gt;bold&lt;/b&gt; &#39;entities&#39;",
    "ﬁne ligatures ﬂow",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ！",
    "em—dash – en-dash - hyphen",
    "mojibake cafÃ© and donâ€™t",
    "ΟΔΟΣ final sigma",
    "İstanbul and DİYARBAKIR",
    "猫と犬。고양이! القطة؟ नमस्ते",
    "emoji🐱inside 👍🏽 and ✓ marks",
    "a\u00a0no-break\u3000ideographic\u2009thin space",
    "rock'n'roll, 100% $5 #tag @user a/b a\\b ~^_`{}|[]<>",
    "3.14159 and 1,000,000",
    "",
    "   ",
    "!!!",
]


def ml_l3m_caption(text: str) -> str:
    """ml-l3m's text before its tokenizer, line by line from apple/ml-l3m
    src/l3m/model/layers/tokenizers.py (`basic_clean`, `whitespace_clean`, `HFTokenizer.__call__`
    with clean_text and lower_case), then the SigLIP tokenizer's own `canonicalize_text`
    (transformers models/siglip/tokenization_siglip.py, do_lower_case=True)."""
    import ftfy
    import regex

    text = ftfy.fix_text(text)  # basic_clean
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = regex.sub(r"\s+", " ", text)  # whitespace_clean
    text = text.strip()
    text = text.lower()  # lower_case
    text = text.lower()  # canonicalize_text: do_lower_case
    text = text.translate(str.maketrans("", "", string.punctuation))  # remove_punctuation
    text = re.sub(r"\s+", " ", text)
    return text.strip()


@pytest.mark.parametrize("caption", TRICKY)
def test_caption_normalisation_equals_ml_l3ms(caption):
    assert normalize_caption(caption) == ml_l3m_caption(caption)


def test_normalisation_strips_ascii_punctuation_and_keeps_letters_of_every_script():
    assert normalize_caption("A Photo, of: the CAT!!!") == "a photo of the cat"
    # ftfy uncurls quotes and splits ligatures
    assert normalize_caption("“curly” ﬁne") == "curly fine"
    # not ASCII punctuation: kept, as ml-l3m keeps it
    assert normalize_caption("猫と犬。") == "猫と犬。"


CAPTIONS = [
    "a small red circle",
    "a large blue square above a small red circle",
    "two green triangles",
    "a tiny yellow star left of a big purple circle",
    "one orange square",
] * 4


def unigram_tokenizer_json(path: Path, captions=CAPTIONS) -> Path:
    """A sentencepiece-style Unigram tokenizer.json, laid out as SigLIP's conversion is: <pad> 0,
    </s> 1 appended by the post-processor, <unk> 2, Metaspace pieces; padding with <pad>."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=48,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="<pad>")
    tokenizer.save(str(path))
    return path


@pytest.fixture
def unigram(tmp_path) -> Path:
    (tmp_path / "unigram").mkdir()
    return unigram_tokenizer_json(tmp_path / "unigram" / "tokenizer.json")


def test_a_unigram_tokenizer_json_gives_its_own_eos_and_pad_ids(unigram):
    tok = load_tokenizer(unigram, 20)
    assert json.loads(unigram.read_text())["model"]["type"] == "Unigram"
    assert (tok.eos_id, tok.pad_id, tok.ignore_ids) == (1, 0, (0, 1))
    ids = tok.encode(["A small, RED circle!", "a tiny yellow star left of a big purple circle"])
    assert ids[0, :4].tolist() != [0, 0, 0, 0] and 1 in ids[0].tolist()
    first_eos = ids[0].tolist().index(1)
    assert set(ids[0, first_eos + 1 :].tolist()) == {0}  # EOS once, then the pad id
    assert ids[1, -1] == 1 and 0 not in ids[1].tolist()  # cut to 19 tokens, EOS kept last
    assert tok.decode(ids[0]) == "a small red circle"


def test_ids_equal_transformers_padding_and_truncation_as_ml_l3m_calls_them(unigram):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(unigram), eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    texts = TRICKY + CAPTIONS[:5] + [" ".join(CAPTIONS)]
    for length in (4, 12):
        # src/l3m/model/layers/tokenizers.py `HFTokenizer.__call__`: max_length padding, truncation
        expected = reference(
            [ml_l3m_caption(t) for t in texts],
            max_length=length,
            padding="max_length",
            truncation=True,
        )["input_ids"]
        np.testing.assert_array_equal(
            load_tokenizer(unigram, length).encode(texts), np.array(expected)
        )


def test_eos_and_pad_come_from_a_tokenizer_config_beside_the_file_and_survive_a_save(
    unigram, tmp_path
):
    (unigram.parent / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<unk>", "pad_token": "</s>"})
    )
    tok = load_tokenizer(unigram.parent, 6)
    assert (tok.eos_id, tok.pad_id) == (2, 1)
    (tmp_path / "saved").mkdir()
    again = load_tokenizer(tok.save(tmp_path / "saved" / "tokenizer.json"), 6)
    assert (again.eos_id, again.pad_id) == (2, 1)
    np.testing.assert_array_equal(again.encode(CAPTIONS[:3]), tok.encode(CAPTIONS[:3]))


def test_a_tokenizer_naming_no_end_token_is_refused_naming_the_file(tmp_path):
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*end-of-sequence"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_a_bert_style_tokenizer_ends_captions_with_its_sep(tmp_path):
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "cat": 5}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok = CaptionTokenizer(tokenizer, 5)
    assert (tok.eos_id, tok.pad_id) == (3, 3)
    assert tok.encode(["A cat."]).tolist() == [[4, 5, 3, 3, 3]]  # no [CLS]: the recipe has no BOS


def test_our_trained_bpe_pads_with_its_eos_and_appends_it(tmp_path):
    tok = train_tokenizer(CAPTIONS, 60, 6)
    assert (tok.eos_id, tok.pad_id, tok.ignore_ids) == (0, 0, (0,))
    ids = tok.encode(["a large blue square above a small red circle"])
    assert ids.shape == (1, 6) and ids[0, -1] == tok.eos_id and tok.eos_id not in ids[0, :-1]


def test_a_unigram_tokenizer_json_drives_aimv2_pretrain_with_its_own_ids(tmp_path, unigram):
    data = write_shapes(tmp_path / "shapes", 8, size=28)
    result = run_cli(
        "pretrain",
        data,
        "-o",
        tmp_path / "run",
        "--tokenizer",
        unigram,
        "--width",
        32,
        "--depth",
        1,
        "--heads",
        1,
        "--image-size",
        28,
        "--decoder-depth",
        1,
        "--decoder-heads",
        1,
        "-b",
        4,
        "--no-compile",
        "--context-length",
        12,
        "--steps",
        2,
        "--log-every",
        1,
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r["loss_text"]) and r["loss_text"] > 0 for r in log)
    tok = load_tokenizer(run / "tokenizer.json", 12)  # what --resume reads: the same ids
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (
        1,
        0,
        Tokenizer.from_file(str(unigram)).get_vocab_size(),
    )
    config = PretrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    source = load_captioned(data)
    ids = BatchPlan(source, tok, config).step(0).micro[0].input_ids
    for row in ids.tolist():
        end = row.index(1)
        assert set(row[end + 1 :]) <= {0} and 0 not in row[:end] and 1 not in row[:end]
    assert text_count(ids, tok.ignore_ids) == sum(row.index(1) for row in ids.tolist())


def test_a_saved_tokenizer_json_gives_transformers_the_same_ids(unigram, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(unigram, 10)
    saved = tok.save(tmp_path / "tokenizer.json")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(saved))
    texts = [normalize_caption(t) for t in TRICKY + CAPTIONS[:5]]
    expected = reference(texts, max_length=10, padding="max_length", truncation=True)["input_ids"]
    np.testing.assert_array_equal(tok.encode(texts), np.array(expected))
