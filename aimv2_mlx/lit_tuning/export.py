"""A LiT run → a LiT model folder used exactly like a converted `aimv2-large-patch14-224-lit`:
`config.json` (aimv2-mlx format, with its `text` section), `model.safetensors` and the CLIP
tokenizer files beside them, which `load()`, `ZeroShotClassifier` and search read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..folders import atomic_folder
from ..model import load, save
from ..train.checkpoint import resume_point
from .config import KIND
from .loop import (
    CHECKPOINT_FILES,
    TOKENIZER,
    TOKENIZER_FILES,
    check_encoder,
    read_config,
)
from .towers import build_lit, locked_weights


def is_lit_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a LiT run folder or one of its checkpoints (not a pre-training run)."""
    path = Path(path).expanduser()
    run = path.parent.parent if (path / "lit.safetensors").is_file() else path
    try:
        return json.loads((run / "config.json").read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def export_lit(
    run_or_checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the LiT model of a run's latest complete checkpoint (or of the checkpoint given) into
    `out`, atomically. The config's `source` records the encoder, data, step and pairs seen;
    `extra` (e.g. zero-shot scores) is added to it."""
    path = Path(run_or_checkpoint).expanduser()
    if (path / "lit.safetensors").is_file():
        checkpoint, run = path, path.parent.parent
    else:
        run = path
        checkpoint = (
            resume_point(run, CHECKPOINT_FILES)[0] if (run / "checkpoints").is_dir() else None
        )
        if checkpoint is None:
            raise FileNotFoundError(f"{run}: a LiT run with no checkpoint yet")
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    config = read_config(run)
    state = json.loads((checkpoint / "state.json").read_text())
    encoder = load(config.encoder)
    check_encoder(config, encoder)
    model = build_lit(
        config,
        locked_weights(encoder),
        encoder.config.preprocess,
        name=name or f"{encoder.config.name}-lit",
        cpu_backend=False,
    )
    model.load_weights(str(checkpoint / "lit.safetensors"), strict=False)
    model.config.source = {
        "origin": "aimv2 lit",
        "encoder": config.encoder,
        "encoder_identity": config.encoder_identity,
        "data": state.get("data", {}).get("origin"),
        "step": state["step"],
        "samples_seen": state.get("samples_seen"),
        "loss": config.loss,
        "trained": "text tower, attention-pool head, projections, logit scale",
        **(extra or {}),
    }
    with atomic_folder(out) as tmp:
        save(model, tmp)
        for file in TOKENIZER_FILES:
            if (run / TOKENIZER / file).is_file():
                shutil.copyfile(run / TOKENIZER / file, tmp / file)
    return out
