"""CLIP's byte-level BPE for the LiT text tower, read from the files that ship with the checkpoint.

Built on the `tokenizers` library, configured as CLIP's tokenizer: NFC, whitespace runs to one
space, lower-case; CLIP's split regex; byte-level symbols; BPE with the `</w>` end-of-word suffix.
A `tokenizer.json` beside the weights is used as written (it is what the checkpoint's authors
shipped); otherwise `vocab.json` + `merges.txt` get that CLIP configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
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
        folder = Path(folder)
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
