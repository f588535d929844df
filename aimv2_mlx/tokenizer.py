"""Tokenizers on the `tokenizers` library, all behind one class, `CaptionTokenizer` (texts to
fixed-length ids ending in EOS, then padding): the caption tokenizer of pre-training and LiT (a
BPE trained on the captions, or any Hugging Face `tokenizer.json`, with ml-l3m's caption
normalisation), and CLIP's byte-level BPE of Apple's LiT (`clip_tokenizer`: start token too).

CLIP's is configured as CLIP's tokenizer: NFC, whitespace runs to one space, lower-case;
CLIP's split regex; byte-level symbols; BPE with the `</w>` end-of-word suffix. A
`tokenizer.json` beside the weights is used as written (it is what the checkpoint's authors
shipped); otherwise `vocab.json` + `merges.txt` get that CLIP configuration (`clip_bpe`).
"""

from __future__ import annotations

import html
import json
import os
import re
import string
from collections.abc import Callable, Iterable
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers.models import BPE

from .errors import SettingError, UnusableFileError
from .folders import atomic_write

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
MAX_CAPTION_CHARS = 1000  # longer captions are cut before BPE training (see `bounded_captions`)
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, and
# runs of anything else that is not whitespace.
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def clip_pipeline(backend: Tokenizer) -> Tokenizer:
    """`backend` with CLIP's normalizer and pre-tokenizer (what its BPE is applied to)."""
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return backend


def clip_bpe(vocab: str | os.PathLike, merges: str | os.PathLike) -> Tokenizer:
    """CLIP's configuration around a `vocab.json` and a `merges.txt`."""
    try:
        model = BPE.from_file(
            str(vocab),
            str(merges),
            unk_token=END_TOKEN,
            end_of_word_suffix="</w>",
            continuing_subword_prefix="",
            fuse_unk=False,
        )
    except Exception as exc:
        raise UnusableFileError(f"{vocab}, {merges}: not a BPE vocabulary ({exc})") from None
    if model.token_to_id(START_TOKEN) is None or model.token_to_id(END_TOKEN) is None:
        raise UnusableFileError(
            f"{vocab}: vocabulary lacks {START_TOKEN} or {END_TOKEN}: not a CLIP vocabulary"
        )
    backend = clip_pipeline(Tokenizer(model))
    # Written literally in a text, the special tokens stay single ids, as in CLIP.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (START_TOKEN, END_TOKEN)]
    )
    return backend


def is_clip_vocabulary(backend: Tokenizer) -> bool:
    """Whether a tokenizer holds CLIP's start and end tokens (OpenAI CLIP, Apple's LiT)."""
    return None not in (backend.token_to_id(START_TOKEN), backend.token_to_id(END_TOKEN))


def clip_tokenizer(
    backend: Tokenizer, context_length: int = CONTEXT_LENGTH, pad_id: int = 0
) -> CaptionTokenizer:
    """Texts the way OpenAI's CLIP (and Apple's LiT) tokenizes them: the backend's own
    normalisation, start token, BPE tokens, end token, then zeros (openai/CLIP `clip/clip.py`
    `tokenize`). The LiT text tower reads up to its first end token, so the padding never matters.
    """
    if not is_clip_vocabulary(backend):
        raise UnusableFileError(
            f"tokenizer vocabulary lacks {START_TOKEN} or {END_TOKEN}: not a CLIP vocabulary"
        )
    return CaptionTokenizer(
        backend,
        context_length,
        backend.token_to_id(END_TOKEN),
        pad_id,
        bos_id=backend.token_to_id(START_TOKEN),
        normalize=None,
    )


def text_tokenizer(
    path: str | os.PathLike,
    context_length: int = CONTEXT_LENGTH,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> CaptionTokenizer:
    """The tokenizer of a LiT model or run folder (or a `tokenizer.json` given for one).

    CLIP's BPE (`vocab.json` + `merges.txt`, or a `tokenizer.json` holding CLIP's start and end
    tokens, used as written) is read the CLIP way of `clip_tokenizer`, as Apple's LiT was
    trained; any other Hugging Face `tokenizer.json` the caption way of `load_tokenizer` (its own
    EOS and pad ids, ml-l3m's normalisation). `eos_id` / `pad_id`: what the model's config
    records; a tokenizer that ends texts (or, not CLIP's, pads them) otherwise is refused, naming
    the file. CLIP's pads with zeros whatever the config says, as OpenAI's CLIP.
    """
    path = Path(path).expanduser()
    file = path if path.is_file() else path / "tokenizer.json"
    if file.is_file():
        backend = _read_tokenizer_json(file)
        if is_clip_vocabulary(backend):
            tok, pad_id = clip_tokenizer(backend, context_length), None
        else:
            tok = load_tokenizer(file, context_length)
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        file = path / "vocab.json"
        tok, pad_id = clip_tokenizer(clip_bpe(file, path / "merges.txt"), context_length), None
    else:
        raise FileNotFoundError(
            f"{path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)"
        )
    for name, found, recorded in (
        ("eos_token_id", tok.eos_id, eos_id),
        ("pad_token_id", tok.pad_id, pad_id),
    ):
        if recorded is not None and found != recorded:
            raise UnusableFileError(
                f"{file}: gives {name.split('_')[0].upper()} id {found}, but "
                f"the model's config says text.{name} {recorded}"
            )
    return tok


def _read_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise UnusableFileError(f"{path}: not a tokenizers JSON file ({exc})") from None


# --- captions, for pre-training and LiT -------------------------------------------------------
# As apple/ml-l3m tokenizes captions (configs/aimv2/001_aimv2_hfdata.yaml: `HFTokenizer` over
# SigLIP's tokenizer, context 77): cleaned, lower-cased, punctuation stripped, no BOS, EOS
# appended (a caption too long keeps its first T - 1 tokens, then EOS), padded with the pad id;
# the loss ignores the pad id (ml-l3m's ignore_index) and EOS (SigLIP pads with EOS, so there
# EOS is never a target). The same for every tokenizer, ours or a Hugging Face `tokenizer.json`.

EOS = "<eos>"
UNK = "<unk>"
TOKENIZER_CONFIG = "tokenizer_config.json"  # transformers' file naming eos_token and pad_token
# End-of-sequence tokens of common tokenizers, tried when nothing names one (T5/SigLIP, GPT-2/CLIP,
# ours, Llama 3, BERT).
END_TOKENS = ("</s>", "<|endoftext|>", EOS, "<|end_of_text|>", "[SEP]")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_caption(text: str) -> str:
    """ml-l3m's caption cleaning, then SigLIP's canonicalisation.

    src/l3m/model/layers/tokenizers.py `HFTokenizer.__call__`: `basic_clean` (ftfy.fix_text,
    html.unescape twice, strip), `whitespace_clean` (whitespace runs to one space, strip), lower;
    then transformers' models/siglip/tokenization_siglip.py `canonicalize_text`: ASCII
    punctuation (`string.punctuation`) removed, whitespace collapsed again, strip.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = re.sub(r"\s+", " ", text).strip().lower()
    return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()


class CaptionTokenizer:
    """Captions to (B, context_length) ids the ml-l3m way, over any `tokenizers.Tokenizer`.

    `eos_id` and `pad_id` default to what `special_ids` finds in the tokenizer (pad: EOS).
    `bos_id` (CLIP's start token) opens every text when set; `normalize` is applied to each text
    before the tokenizer (None: the tokenizer's own normaliser alone, as CLIP's).
    """

    def __init__(
        self,
        tokenizer,
        context_length: int = 77,
        eos_id: int | None = None,
        pad_id: int | None = None,
        bos_id: int | None = None,
        normalize: Callable[[str], str] | None = normalize_caption,
    ):
        self.tokenizer = tokenizer
        self.bos_id, self.normalize = bos_id, normalize
        self.context_length = self._checked_length(context_length)
        if eos_id is None or pad_id is None:
            found_eos, found_pad = special_ids(tokenizer)
            eos_id = found_eos if eos_id is None else eos_id
            if pad_id is None:
                pad_id = eos_id if found_pad is None else found_pad
        tokenizer.no_padding()  # a tokenizer.json may pad or truncate on its own: we do both here
        tokenizer.no_truncation()
        self.eos_id, self.pad_id = eos_id, pad_id
        self.vocab_size = tokenizer.get_vocab_size()
        for name, value in (("EOS", self.eos_id), ("pad", self.pad_id), ("BOS", bos_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise SettingError(
                    f"{name} id {value} is outside the vocabulary of {self.vocab_size} tokens"
                )

    @property
    def ignore_ids(self) -> tuple[int, ...]:
        """Targets the text loss skips: pad (ml-l3m's ignore_index) and EOS."""
        return tuple(sorted({self.eos_id, self.pad_id}))

    def _checked_length(self, length: int) -> int:
        if length < 2 + (self.bos_id is not None):
            raise SettingError(
                f"context length {length}: a caption needs a token and EOS"
                + (" after the start token" if self.bos_id is not None else "")
            )
        return length

    def encode(
        self, captions: str | Iterable[str], context_length: int | None = None
    ) -> np.ndarray:
        """(B, context_length) int32 ids: each caption normalised, tokenized without the
        tokenizer's own special tokens, cut to fit, [BOS,] ids, EOS, then pad ids."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        length = (
            self.context_length if context_length is None else self._checked_length(context_length)
        )
        start = [] if self.bos_id is None else [self.bos_id]
        out = np.full((len(captions), length), self.pad_id, dtype=np.int32)
        texts = [self.normalize(caption) for caption in captions] if self.normalize else captions
        for i, encoding in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids = [*start, *encoding.ids[: length - 1 - len(start)], self.eos_id]
            out[i, : len(ids)] = ids
        return out

    def token_ids(self, text: str) -> list[int]:
        """The tokens of one text as `encode` makes them, without BOS, EOS, cut or padding."""
        text = self.normalize(text) if self.normalize else text
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Ids up to the first EOS (or pad) back to text."""
        ids = [int(i) for i in ids]
        if self.bos_id is not None and ids[:1] == [self.bos_id]:
            ids = ids[1:]
        for stop in (self.eos_id, self.pad_id):
            if stop in ids:
                ids = ids[: ids.index(stop)]
        return self.tokenizer.decode(ids).strip()

    def save(self, path: str | os.PathLike) -> Path:
        """A `tokenizer.json` that says what this one does: its post-processor appends EOS and its
        padding uses the pad id, so `load_tokenizer` (and transformers'
        `PreTrainedTokenizerFast`) find the same ids again. Not CLIP's BPE (the one with a BOS):
        it stays in the files it came in, as Apple's LiT ships them."""
        if self.bos_id is not None:
            raise SettingError(
                "a CLIP BPE is kept in its own files (vocab.json + merges.txt or "
                "its tokenizer.json), not saved as a caption tokenizer"
            )
        path = Path(path).expanduser()
        described = Tokenizer.from_str(self.tokenizer.to_str())
        eos, pad = (described.id_to_token(i) for i in (self.eos_id, self.pad_id))
        described.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", special_tokens=[(eos, self.eos_id)]
        )
        described.enable_padding(pad_id=self.pad_id, pad_token=pad)
        atomic_write(path, lambda tmp: described.save(str(tmp)))
        return path


def special_ids(tokenizer, config: dict | None = None) -> tuple[int, int | None]:
    """(EOS id, pad id or None) of a tokenizer, from what its files say.

    EOS: `config`'s (a transformers `tokenizer_config.json`) `eos_token`; else the special token
    the tokenizer's post-processor appends to a single sequence (TemplateProcessing, e.g. SigLIP's
    "$A </s>"; BERT/RoBERTa's sep); else the first of `END_TOKENS` in the vocabulary. Pad:
    `config`'s `pad_token`, else the tokenizer's own padding, else None.
    """
    described = json.loads(tokenizer.to_str())
    config = config or {}

    def named(field: str) -> int | None:
        token = config.get(field)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return None
        found = tokenizer.token_to_id(str(token))
        if found is None:
            raise ValueError(f"{TOKENIZER_CONFIG}: its {field} {token!r} is not in the vocabulary")
        return found

    eos = named("eos_token")
    if eos is None:
        eos = _appended_special(described.get("post_processor"), tokenizer)
    if eos is None:
        known = [tokenizer.token_to_id(t) for t in END_TOKENS]
        eos = next((i for i in known if i is not None), None)
    if eos is None:
        raise ValueError(
            "no end-of-sequence token: the tokenizer names none (tokenizer_config"
            ".json eos_token, or a post-processor appending one) and has none of "
            + ", ".join(END_TOKENS)
        )
    pad = named("pad_token")
    if pad is None and isinstance(described.get("padding"), dict):
        pad = described["padding"].get("pad_id")
    return eos, pad


def _appended_special(processor, tokenizer) -> int | None:
    """The id of the special token a post-processor puts after a single sequence, if any."""
    if not isinstance(processor, dict):
        return None
    kind = processor.get("type")
    if kind == "Sequence":
        for inner in processor.get("processors", []):
            found = _appended_special(inner, tokenizer)
            if found is not None:
                return found
    if kind in ("BertProcessing", "RobertaProcessing") and isinstance(processor.get("sep"), list):
        return tokenizer.token_to_id(processor["sep"][0])
    if kind == "TemplateProcessing":
        single = processor.get("single") or []
        after = [item for item in single if isinstance(item, dict)]
        sequence = next((i for i, item in enumerate(after) if "Sequence" in item), None)
        for item in after[sequence + 1 :] if sequence is not None else []:
            if "SpecialToken" in item:
                return tokenizer.token_to_id(item["SpecialToken"]["id"])
    return None


def bounded_captions(
    captions: Iterable[str], max_chars: int = MAX_CAPTION_CHARS
) -> tuple[list[str], int]:
    """Captions cut to `max_chars` characters, and how many were cut.

    BPE training time grows with the square of a word's length (every merge rescans it), so one
    megabyte-long token would stall it for hours; a caption longer than the context can hold
    teaches the tokenizer nothing the cut one does not.
    """
    kept, cut = [], 0
    for caption in captions:
        if len(caption) > max_chars:
            caption, cut = caption[:max_chars], cut + 1
        kept.append(caption)
    return kept, cut


def train_tokenizer(
    captions: Iterable[str],
    vocab_size: int = 4096,
    context_length: int = 77,
    min_frequency: int = 2,
    report: Callable[[str], None] | None = None,
) -> CaptionTokenizer:
    """A BPE over the captions (ids 0 and 1 are EOS and UNK); `report` hears how many were cut."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), "")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, UNK],
        show_progress=False,
    )
    captions, cut = bounded_captions(captions)
    if cut and report is not None:
        report(
            f"cut {cut} captions to {MAX_CAPTION_CHARS} characters before training the tokenizer"
        )
    tok.train_from_iterator([normalize_caption(caption) for caption in captions], trainer)
    return CaptionTokenizer(tok, context_length)


def load_tokenizer(path: str | os.PathLike, context_length: int = 77) -> CaptionTokenizer:
    """Any Hugging Face `tokenizer.json` (a file, or a folder holding one: BPE, WordPiece, Unigram
    such as sentencepiece conversions), its EOS and pad ids taken from it and from a
    `tokenizer_config.json` beside it (see `special_ids`).

    The caption API LiT tuning and pre-training share: `encode(captions)`, `eos_id`, `pad_id`,
    `ignore_ids`, `vocab_size`.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    tok = _read_tokenizer_json(path)
    config_path = path.with_name(TOKENIZER_CONFIG)
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
    except (OSError, ValueError) as exc:
        raise UnusableFileError(f"{config_path}: not readable JSON ({exc})") from None
    if config is not None and not isinstance(config, dict):
        raise UnusableFileError(f"{config_path}: not a JSON object")
    try:
        eos, pad = special_ids(tok, config)
        return CaptionTokenizer(tok, context_length, eos, pad)
    except ValueError as exc:
        raise UnusableFileError(f"{path}: {exc}") from None
