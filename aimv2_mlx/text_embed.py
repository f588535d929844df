"""Texts to LiT text embeddings — what zero-shot classes and text search compare images with.

Texts are tokenised with the model's CLIP BPE (the files beside its weights), each batch is cut
after its longest text's end token — the causal text tower pooled at the first end token never
sees what follows it, so this changes nothing and makes short texts several times cheaper than
the full context — then encoded, projected and L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .errors import SettingError
from .lit import l2_normalize
from .tokenizer import ClipTokenizer

TEXT_BATCH = 64


def trim_padding(input_ids: np.ndarray, end_id: int, multiple: int = 1) -> np.ndarray:
    """The batch cut after its longest text's end token, rounded up to `multiple` tokens (a few
    shapes for a compiled step), never beyond its own length."""
    last = int((input_ids == end_id).argmax(axis=1).max()) + 1
    return input_ids[:, : min(input_ids.shape[1], -(-last // multiple) * multiple)]


def model_tokenizer(model) -> ClipTokenizer:
    """The CLIP BPE shipped in the folder the model was loaded from."""
    location = model.location
    if location is None:
        raise SettingError(
            f"{model.config.name}: not loaded from a folder, so no tokenizer "
            "files; pass tokenizer=ClipTokenizer.from_folder(…)"
        )
    return ClipTokenizer.from_folder(location.folder)


def embed_texts(
    model,
    texts: Sequence[str],
    tokenizer: ClipTokenizer | None = None,
    batch_size: int = TEXT_BATCH,
) -> mx.array:
    """(N, projection_dim) unit-length text embeddings of `texts` (a LiT model)."""
    if not model.config.is_lit:
        raise SettingError(f"{model.config.name}: not a LiT model (no text tower)")
    tokenizer = tokenizer or model_tokenizer(model)
    ids = tokenizer(list(texts), context_length=model.config.text.max_position_embeddings)
    chunks = [
        l2_normalize(
            model.encode_text(mx.array(trim_padding(ids[i : i + batch_size], tokenizer.end_id)))
        )
        for i in range(0, len(ids), batch_size)
    ]
    out = mx.concatenate(chunks)
    mx.eval(out)
    return out
