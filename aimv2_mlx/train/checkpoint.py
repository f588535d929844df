"""Training checkpoints, written atomically: a folder built under a temporary name and renamed
into place, then a `latest` pointer replaced atomically. A checkpoint holds the encoder (an MLX
model folder `aimv2 embed` can load), the decoder, the optimizer state (moments, step, lr), and
`state.json` (step, samples seen, seed). All training randomness is drawn from (seed, step) or
(seed, epoch, sample) (see `batches`), so the seed and the step are the whole RNG state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..model import save as save_encoder

LATEST = "latest"


def save_checkpoint(run: Path, step: int, model, optimizer, state: dict, keep: int = 3) -> Path:
    folder = run / "checkpoints" / f"step-{step:08d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_encoder(model.encoder, tmp / "encoder")
    mx.save_safetensors(str(tmp / "decoder.safetensors"), dict(tree_flatten(model.decoder.parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    pointer = run / "checkpoints" / (LATEST + ".tmp")
    pointer.write_text(folder.name + "\n")
    os.replace(pointer, run / "checkpoints" / LATEST)
    for old in sorted((run / "checkpoints").glob("step-*[0-9]"))[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run: Path) -> Path | None:
    pointer = run / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    folder = run / "checkpoints" / pointer.read_text().strip()
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"{folder}: the latest checkpoint is missing or incomplete")
    return folder


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Weights and optimizer state into `model`/`optimizer`; returns `state.json`."""
    model.encoder.load_weights(str(folder / "encoder" / "model.safetensors"))
    model.decoder.load_weights(str(folder / "decoder.safetensors"))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((folder / "state.json").read_text())
