"""Texts to LiT text embeddings — what zero-shot classes and text search compare images with.

Texts are tokenised with the model's tokenizer (the files beside its weights, with the EOS and
pad ids its config records), each batch is cut after its longest text's end token — the causal
text tower pooled at the first end token never sees what follows it, so this changes nothing
and makes short texts several times cheaper than the full context — then encoded, projected and
L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .errors import SettingError
from .lit import l2_normalize
from .tokenizer import CaptionTokenizer, text_tokenizer

TEXT_BATCH = 64


def trim_padding(input_ids: np.ndarray, end_id: int, multiple: int = 1) -> np.ndarray:
    """The batch cut after its longest text's end token, rounded up to `multiple` tokens (a few
    shapes for a compiled step), never beyond its own length."""
    last = int((input_ids == end_id).argmax(axis=1).max()) + 1
    return input_ids[:, : min(input_ids.shape[1], -(-last // multiple) * multiple)]


def model_tokenizer(model) -> CaptionTokenizer:
    """The tokenizer shipped in the folder the model was loaded from, ending and padding texts
    with the ids its config records (the ids the text tower was trained with)."""
    location, text = model.location, model.config.text
    if location is None:
        raise SettingError(
            f"{model.config.name}: not loaded from a folder, so no tokenizer "
            "files; pass tokenizer=text_tokenizer(FOLDER)"
        )
    return text_tokenizer(
        location.folder, text.max_position_embeddings, text.eos_token_id, text.pad_token_id
    )


def embed_texts(
    model,
    texts: Sequence[str],
    tokenizer: CaptionTokenizer | None = None,
    batch_size: int = TEXT_BATCH,
) -> mx.array:
    """(N, projection_dim) unit-length text embeddings of `texts` (a LiT model)."""
    if not model.config.is_lit:
        raise SettingError(f"{model.config.name}: not a LiT model (no text tower)")
    tokenizer = tokenizer or model_tokenizer(model)
    ids = tokenizer.encode(list(texts), model.config.text.max_position_embeddings)
    chunks = [
        l2_normalize(
            model.encode_text(mx.array(trim_padding(ids[i : i + batch_size], tokenizer.eos_id)))
        )
        for i in range(0, len(ids), batch_size)
    ]
    out = mx.concatenate(chunks)
    mx.eval(out)
    return out
