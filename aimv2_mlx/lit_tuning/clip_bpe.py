"""A CLIP-style BPE learned on a run's captions, for a text tower that has no tokenizer yet.

The files are what Apple's LiT ships (`vocab.json` + `merges.txt`, read by `text_tokenizer`):
OpenAI CLIP's layout (openai/CLIP `clip/simple_tokenizer.py`) — the 256 byte symbols, the same
with the `</w>` end-of-word suffix, one entry per merge, then `<|startoftext|>` and
`<|endoftext|>` last. The merges come from the `tokenizers` BPE trainer run over the captions
pre-tokenized exactly as `clip_bpe` does it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, trainers

from ..errors import SettingError
from ..tokenizer import (
    END_TOKEN,
    START_TOKEN,
    CaptionTokenizer,
    bounded_captions,
    clip_pipeline,
    text_tokenizer,
)

BASE = 2 * 256 + 2  # byte symbols, with and without </w>, and the two special tokens


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte value, in CLIP's vocabulary order."""
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = dict(zip(visible, visible, strict=True)), 0
    for byte in range(256):
        if byte not in chars:
            chars[byte], extra = 256 + extra, extra + 1
    return [chr(chars[byte]) for byte in visible + [b for b in range(256) if b not in visible]]


def train_clip_tokenizer(
    captions: Iterable[str],
    folder: str | os.PathLike,
    vocab_size: int = 1024,
    min_frequency: int = 2,
) -> CaptionTokenizer:
    """Learn up to `vocab_size - 514` merges on `captions`, write `vocab.json` + `merges.txt`
    into `folder`, and return the tokenizer read back from them."""
    if vocab_size < BASE:
        raise SettingError(
            f"--vocab-size {vocab_size}: a CLIP vocabulary holds at least {BASE} tokens "
            "(256 bytes, each with and without </w>, start and end)"
        )
    captions, _ = bounded_captions(captions)
    symbols = byte_symbols()
    backend = clip_pipeline(
        Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=symbols,
        end_of_word_suffix="</w>",
        special_tokens=[],
    )
    backend.train_from_iterator(captions, trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(backend.to_str())["model"]["merges"]
    ][: vocab_size - BASE]
    vocab = symbols + [s + "</w>" for s in symbols]
    known = set(vocab)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            vocab.append(left + right)
    vocab += [START_TOKEN, END_TOKEN]
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return text_tokenizer(folder)
