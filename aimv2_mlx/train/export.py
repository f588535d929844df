"""`aimv2 export`: a training run's (or checkpoint's) encoder as an encoder-only MLX model folder
that `aimv2 embed`/`probe` and `aimv2_mlx.load` read. The decoder stays behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..folders import atomic_folder
from ..model import load, save
from .checkpoint import latest_checkpoint


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder's latest checkpoint."""
    path = Path(path).expanduser()
    if (path / "state.json").is_file() and (path / "encoder").is_dir():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{path}: not a training run or checkpoint folder")
    return found


def export_encoder(run_or_checkpoint: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                   extra: dict | None = None) -> Path:
    """Write the encoder (config.json + model.safetensors) into `out`, atomically.

    The config's `source` records the run, step, samples seen and objective; `extra` (e.g.
    probe scores) is added to it.
    """
    checkpoint = find_checkpoint(run_or_checkpoint)
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    state = json.loads((checkpoint / "state.json").read_text())
    encoder = load(checkpoint / "encoder")
    config = encoder.config
    if name:
        config.name = name
    config.source = {**config.source, "checkpoint": str(checkpoint.resolve()), "step": state["step"],
                     "samples_seen": state.get("samples_seen"), **(extra or {})}
    with atomic_folder(out) as tmp:
        save(encoder, tmp)
    return out
