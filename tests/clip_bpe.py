"""A small CLIP-style vocabulary learned here, and OpenAI's pure-Python CLIP BPE as a reference.

transformers 5 no longer ships the slow (pure-Python) `CLIPTokenizer`; `reference_ids` follows
OpenAI's `simple_tokenizer.py` (its `bpe` loop and vocabulary order) without the `ftfy`/HTML
clean-up, which neither transformers' nor our tokenizer applies. It shares no code with the
`tokenizers` library, so tests compare our ids against two independent implementations.
"""

from __future__ import annotations

import collections
import itertools
import json
import unicodedata
from pathlib import Path

import regex

START, END = "<|startoftext|>", "<|endoftext|>"
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

CORPUS = """
A photo of a cat. A photo of a dog. A bad photo of the cat; art of the dog, itap of a bird!
The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill.
Photographs of astronauts, rockets and coffee cups: the rocket launched at 10:42 on 2024-06-01.
It's a lovely day, isn't it? We'll see; they're sure you've heard what I'd said and I'm done.
Large and small photos of the red car, a blue bicycle, an orange tabby cat and a golden retriever.
A cup of coffee with milk foam, a plate of pasta, the astronaut's helmet, the rocket's engine.
Zero-shot classification labels: cat, dog, car, coffee, rocket, astronaut, tree, house, person.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_ENCODER = bytes_to_unicode()


def clean(text: str) -> str:
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()


def pieces(text: str) -> list[str]:
    """Pre-tokenized, byte-encoded words."""
    return [
        "".join(BYTE_ENCODER[b] for b in p.encode("utf-8")) for p in PATTERN.findall(clean(text))
    ]


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Greedy BPE over the words of `text` (most frequent pair first, ties by the pair itself)."""
    words = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in pieces(text))
    merges: list[tuple[str, str]] = []
    made = set(BYTE_ENCODER.values()) | {v + "</w>" for v in BYTE_ENCODER.values()}
    while len(merges) < count:
        pairs = collections.Counter()
        for word, freq in words.items():
            for pair in itertools.pairwise(word):
                if pair[0] + pair[1] not in made:
                    pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        made.add(best[0] + best[1])
        words = collections.Counter({_merge(word, best): f for word, f in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_vocab(folder: Path, merges_count: int = 300) -> dict[str, int]:
    """vocab.json + merges.txt in CLIP's order: bytes, bytes + </w>, merges, start, end."""
    merges = learn_merges(CORPUS, merges_count)
    symbols = list(BYTE_ENCODER.values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    encoder = {token: i for i, token in enumerate(vocab)}
    assert len(encoder) == len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return encoder


def reference_ids(text: str, folder: Path) -> list[int]:
    """OpenAI CLIP's BPE, without start/end tokens."""
    encoder = json.loads((folder / "vocab.json").read_text())
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(line for line in lines if line)}
    ids = []
    for token in pieces(text):
        if token in (START, END):
            ids.append(encoder[token])
        else:
            ids.extend(encoder[t] for t in _bpe(token, ranks).split(" "))
    return ids


def _bpe(token: str, ranks: dict) -> str:
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
        pairs = set(itertools.pairwise(word))
        bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if bigram not in ranks:
            break
        word = _merge(word, bigram)
    return " ".join(word)
