"""Tokenizers, both on the `tokenizers` library: CLIP's byte-level BPE for the LiT text tower
(`ClipTokenizer`, read from the files that ship with the checkpoint), and the caption BPE of
pre-training (`CaptionTokenizer`, trained on the captions or loaded from a `tokenizer.json`).

The CLIP one is configured as CLIP's tokenizer: NFC, whitespace runs to one space, lower-case;
CLIP's split regex; byte-level symbols; BPE with the `</w>` end-of-word suffix. A
`tokenizer.json` beside the weights is used as written (it is what the checkpoint's authors
shipped); otherwise `vocab.json` + `merges.txt` get that CLIP configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        trainers)
from tokenizers.models import BPE

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
MAX_CAPTION_CHARS = 1000  # longer captions are cut before BPE training (see `bounded_captions`)
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, and
# runs of anything else that is not whitespace.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipTokenizer:
    """Texts to fixed-length id arrays: start token, BPE tokens, end token, zero padding."""

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        ids = [backend.token_to_id(token) for token in (START_TOKEN, END_TOKEN)]
        if None in ids:
            raise ValueError(f"tokenizer vocabulary lacks {START_TOKEN} or {END_TOKEN}: not a CLIP vocabulary")
        self.start_id, self.end_id = ids

    @classmethod
    def from_files(cls, vocab: str | os.PathLike, merges: str | os.PathLike) -> "ClipTokenizer":
        """CLIP's configuration around a `vocab.json` and a `merges.txt`."""
        try:
            model = BPE.from_file(str(vocab), str(merges), unk_token=END_TOKEN, end_of_word_suffix="</w>",
                                  continuing_subword_prefix="", fuse_unk=False)
        except Exception as exc:
            raise ValueError(f"{vocab}, {merges}: not a BPE vocabulary ({exc})") from None
        if model.token_to_id(START_TOKEN) is None or model.token_to_id(END_TOKEN) is None:
            raise ValueError(f"{vocab}: vocabulary lacks {START_TOKEN} or {END_TOKEN}: not a CLIP vocabulary")
        backend = Tokenizer(model)
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        # Written literally in a text, the special tokens stay single ids, as in CLIP.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (START_TOKEN, END_TOKEN)])
        return cls(backend)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ClipTokenizer":
        """The tokenizer shipped in a checkpoint folder: `tokenizer.json`, else vocab + merges."""
        folder = Path(folder).expanduser()
        if (folder / "tokenizer.json").is_file():
            try:
                return cls(Tokenizer.from_file(str(folder / "tokenizer.json")))
            except Exception as exc:
                raise ValueError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({exc})") from None
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt")
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start and end tokens or truncation."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | Iterable[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """int32 (B, context_length): start, tokens cut to fit, end, then zeros (as OpenAI's CLIP).

        The LiT text tower reads up to its first end token, so the padding value never matters.
        """
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        out = np.zeros((len(encodings), context_length), dtype=np.int32)
        for row, encoding in enumerate(encodings):
            ids = [self.start_id, *encoding.ids[: context_length - 2], self.end_id]
            out[row, : len(ids)] = ids
        return out


# --- captions for pre-training ----------------------------------------------------------------
# Like the SigLIP tokenizer of the recipe (apple/ml-l3m, configs/aimv2/001_aimv2_hfdata.yaml):
# lower-cased, punctuation stripped, no BOS,
# captions truncated to the context length and padded with the EOS id, which the loss ignores
# (so EOS is never a target).

EOS = "<eos>"
UNK = "<unk>"


class CaptionTokenizer:
    def __init__(self, tokenizer, context_length: int = 77):
        self.tokenizer = tokenizer
        self.context_length = context_length
        eos = tokenizer.token_to_id(EOS)
        self.eos_id = eos if eos is not None else 0
        self.vocab_size = tokenizer.get_vocab_size()

    @property
    def ignore_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def encode(self, captions: list[str]) -> np.ndarray:
        """(B, context_length) int32 ids: truncated, padded with EOS."""
        out = np.full((len(captions), self.context_length), self.eos_id, dtype=np.int32)
        for i, encoding in enumerate(self.tokenizer.encode_batch(list(captions))):
            ids = encoding.ids[: self.context_length]
            out[i, : len(ids)] = ids
        return out

    def decode(self, ids) -> str:
        """Ids up to the first EOS back to text."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids).strip()

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path).expanduser()
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.tokenizer.save(str(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a refused or interrupted save leaves nothing behind
            raise
        return path


def bounded_captions(captions: Iterable[str], max_chars: int = MAX_CAPTION_CHARS) -> tuple[list[str], int]:
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


def train_tokenizer(captions: Iterable[str], vocab_size: int = 4096, context_length: int = 77,
                    min_frequency: int = 2, report: Callable[[str], None] | None = None) -> CaptionTokenizer:
    """A BPE over the captions (ids 0 and 1 are EOS and UNK); `report` hears how many were cut."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), "")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, UNK],
                                  show_progress=False)
    captions, cut = bounded_captions(captions)
    if cut and report is not None:
        report(f"cut {cut} captions to {MAX_CAPTION_CHARS} characters before training the tokenizer")
    tok.train_from_iterator(captions, trainer)
    return CaptionTokenizer(tok, context_length)


def load_tokenizer(path: str | os.PathLike, context_length: int = 77) -> CaptionTokenizer:
    """A `tokenizer.json` (a file, or a folder holding one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a tokenizers JSON file ({exc})") from None
    return CaptionTokenizer(tok, context_length)
