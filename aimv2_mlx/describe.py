"""What `aimv2 info` reports about a model folder, hub id or pre-training run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .model import ModelNotFoundError, build, load, parameter_count
from .train.checkpoint import latest_checkpoint


def describe_model(path_or_id: str | os.PathLike, revision: str | None = None) -> dict:
    """What `aimv2 info` reports about a model: name, origin, size, quantization and config.

    A pre-training run folder is described by its latest checkpoint's encoder, with a hint to
    export it (`run`), since embed and probe want a model folder.
    """
    run = Path(path_or_id).expanduser()
    checkpoint = latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    if (run / "checkpoints").is_dir() and checkpoint is None:
        raise ModelNotFoundError(
            f"{run}: a pre-training run with no checkpoint yet (see --checkpoint-every)"
        )
    model = load(checkpoint / "encoder" if checkpoint else path_or_id, revision)
    config = model.config
    summary = {
        "name": config.name,
        "origin": config.source.get("origin", str(path_or_id)),
        "kind": model.kind,
        # quantized weights are packed, 32/bits to a stored value: count the unquantized model's
        "parameters": parameter_count(
            build(dataclasses.replace(config, quantization=None)) if config.quantization else model
        ),
        "quantization": _quantization(config.quantization),
        "label": config.source.get("label"),
        "trained": _training_summary(config.source),
        "config": config.to_dict(),
    }
    if checkpoint:
        summary["kind"] = (
            f"pre-training run, latest checkpoint {checkpoint.name} ({summary['kind']})"
        )
        summary["run"] = {
            "checkpoint": str(checkpoint),
            "export": f"aimv2 export {run} MODEL_FOLDER",
        }
    return summary


def _quantization(quantization: dict | None) -> str | None:
    if not quantization:
        return None
    return f"{quantization['bits']}-bit, group size {quantization['group_size']}"


def _training_summary(source: dict) -> str | None:
    """Data, steps and probe scores of a model pre-trained by this pipeline (None otherwise)."""
    if "step" not in source:
        return None
    text = f"{source['step']} steps" + (f" on {source['data']}" if source.get("data") else "")
    probe = source.get("probe_scores")
    if probe:
        scores = ", ".join(f"{k} {v:.1f}" for k, v in probe["pretrained"].items())
        text += (
            f"; probe ({probe['what']}): {scores}"
            f" (random init: mean {probe['random_init']['mean']:.1f})"
        )
    lit = source.get("lit")
    if lit:
        text += f"; text tower: LiT-tuned {lit['step']} steps on {lit.get('data')}"
        zero_shot = lit.get("zero_shot_scores")
        if zero_shot:
            scores = [(a, zero_shot[a]) for a in ("color", "shape") if a in zero_shot]
            text += f"; zero-shot ({zero_shot['what']}): " + ", ".join(
                f"{a} {s['zero_shot']:.1f} ({s.get('prompts', 'default')} prompts; "
                f"linear probe {s['linear_probe']:.1f})"
                for a, s in scores
            )
        retrieval = lit.get("retrieval")
        if retrieval:
            text += (
                f"; {retrieval['what']}: recall@5 {retrieval['lit']['recall@5']:.1f} "
                f"(random text tower {retrieval['random_text_tower']['recall@5']:.1f})"
            )
    return text
