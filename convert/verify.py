"""`aimv2 convert --verify`: run the converted model and transformers' PyTorch AIMv2 on the same
fixed input and report how far apart they are.

The reference is built from the *source* checkpoint's tensors (float32, unquantized), put into
transformers' names through the same key map read backwards, so quantization and dtype
choices show up in the figures. torch and transformers are optional (the `test` extra): without
them verification is skipped with a message.
"""

from __future__ import annotations

from aimv2_mlx.model import load
from aimv2_mlx.vectors import l2_normalize
from aimv2_mlx.weights import ours_for_transformers_key

import mlx.core as mx
import numpy as np

SEED = 0


def verify_conversion(folder, checkpoint, recipes) -> dict:
    """{"max_abs_diff", "cosine", "compared", "reference"} or {"skipped": reason}."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return {
            "skipped": "torch and transformers are not installed (pip install 'aimv2-mlx[test]')"
        }
    model = load(folder)
    config = model.config
    source = {
        key: np.array(recipe.build(lambda k: checkpoint.tensors[k].load()).astype(mx.float32))
        for key, recipe in recipes.items()
    }
    reference = _reference(config, source)
    rng = np.random.default_rng(SEED)
    size = config.vision.image_size
    pixels = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    with torch.inference_mode():
        torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if config.is_lit:
            ids = _fixed_ids(rng, config.text)
            out = reference(
                input_ids=torch.from_numpy(ids),
                pixel_values=torch_pixels,
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
            )
            expected = [out.image_embeds.numpy(), out.text_embeds.numpy()]
            got = [
                _normalized(model.encode_image(mx.array(pixels))),
                _normalized(model.encode_text(mx.array(ids))),
            ]
            compared = "normalised image and text embeddings"
        else:
            expected = [reference(torch_pixels).last_hidden_state.numpy()]
            got = [np.array(model(mx.array(pixels)).astype(mx.float32))]
            compared = "post-trunk patch tokens"
    diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    cosine = min(_min_cosine(g, e) for g, e in zip(got, expected, strict=True))
    return {
        "max_abs_diff": diff,
        "cosine": cosine,
        "compared": compared,
        "reference": f"transformers {type(reference).__name__} (PyTorch, float32)",
    }


def _reference(config, source: dict[str, np.ndarray]):
    import torch
    from transformers import Aimv2Config, Aimv2Model, Aimv2VisionConfig, Aimv2VisionModel

    v = config.vision
    vision = dict(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_channels=v.num_channels,
        image_size=v.image_size,
        patch_size=v.patch_size,
        rms_norm_eps=v.rms_norm_eps,
        use_head=v.use_head,
        is_native=v.is_native,
    )
    if config.is_lit:
        t = config.text
        text = dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            eos_token_id=t.eos_token_id,
            rms_norm_eps=t.rms_norm_eps,
        )
        hf_config = Aimv2Config(
            vision_config=vision,
            text_config=text,
            projection_dim=config.projection_dim,
            max_logit_scale=config.max_logit_scale,
        )
        # eager attention: under SDPA transformers drops an all-ones mask and the text tower
        # stops being causal (see tests/test_parity.py)
        reference = Aimv2Model._from_config(hf_config, attn_implementation="eager")
    else:
        reference = Aimv2VisionModel(Aimv2VisionConfig(**vision))
    state = {}
    for key, tensor in reference.state_dict().items():
        value = _from_ours(key, source)
        if value is not None:
            state[key] = torch.from_numpy(np.ascontiguousarray(value.reshape(tuple(tensor.shape))))
    missing = {name for name, _ in reference.named_parameters()} - state.keys()
    if missing:
        raise KeyError(f"no source tensor for the reference's {sorted(missing)[0]!r}")
    reference.load_state_dict(state, strict=False)
    return reference.eval()


def _from_ours(key: str, source: dict[str, np.ndarray]) -> np.ndarray | None:
    """A transformers tensor's value from our layout (q/k/v are row blocks of our qkv)."""
    ours, block = ours_for_transformers_key(key)
    if ours not in source:
        return None
    value = source[ours]
    if block is not None:
        return np.split(value, 3, axis=0)[block]
    return value.transpose(0, 3, 1, 2) if ours.endswith("patchifier.proj.weight") else value


def _fixed_ids(rng, text) -> np.ndarray:
    ids = rng.integers(1, text.eos_token_id, size=(2, text.max_position_embeddings))
    for row, eos_at in enumerate((7, text.max_position_embeddings - 1)):
        ids[row, eos_at] = text.eos_token_id
        ids[row, eos_at + 1 :] = 0
    return ids


def _normalized(x) -> np.ndarray:
    return l2_normalize(np.array(x.astype(mx.float32)))


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float((l2_normalize(a) * l2_normalize(b)).sum(1).min())
