"""Caption tokenizers: a BPE trained on the captions with HF `tokenizers`, or any
`tokenizer.json`. Like the SigLIP tokenizer of the recipe (facts §5): lower-cased, punctuation
stripped, no BOS, captions truncated to the context length and padded with the EOS id, which
the loss ignores (so EOS is never a target).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

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
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)
        return path


def train_tokenizer(captions: Iterable[str], vocab_size: int = 4096, context_length: int = 77,
                    min_frequency: int = 2) -> CaptionTokenizer:
    """A BPE over the captions (ids 0 and 1 are EOS and UNK)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), "")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, UNK],
                                  show_progress=False)
    tok.train_from_iterator(captions, trainer)
    return CaptionTokenizer(tok, context_length)


def load_tokenizer(path: str | os.PathLike, context_length: int = 77) -> CaptionTokenizer:
    """A `tokenizer.json` (a file, or a folder holding one)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a tokenizers JSON file ({exc})") from None
    return CaptionTokenizer(tok, context_length)
