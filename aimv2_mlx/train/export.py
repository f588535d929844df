"""`aimv2 export`: a training run's encoder, or any aimv2-mlx model folder, as a model folder for
MLX (`aimv2 embed`/`probe`, `aimv2_mlx.load`), transformers or apple/ml-aim.

A source is recognised by the functions in `SOURCES`, tried in order; each turns what it
recognises into a model folder and what to record of its history. A new kind of source (a LiT
run) is one more function there. The decoder of a pre-training run stays behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint_io import open_checkpoint
from ..config import FORMAT, ModelConfig
from ..errors import SettingError
from ..export_card import model_card
from ..export_formats import TOKENIZER_FILES, write_format
from ..folders import atomic_folder
from ..hub import upload
from ..lit_tuning.export import export_lit, is_lit_run
from ..model import Location, conversion_plan, load, save
from ..weights import CheckpointError
from .checkpoint import latest_checkpoint

FORMATS = ("mlx", "transformers", "ml-aim")


@dataclass
class Source:
    """A model folder to export, and what to add to its config's `source` (run, step, …)."""

    folder: Path
    provenance: dict = field(default_factory=dict)


@dataclass
class Export:
    """What `export()` wrote."""

    path: Path
    format: str
    name: str
    tensor_bytes: int
    uploaded_to: str | None = None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder's latest checkpoint."""
    path = Path(path).expanduser()
    if (path / "state.json").is_file() and (path / "encoder").is_dir():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{path}: not a training run or checkpoint folder")
    return found


def run_source(path: Path) -> Source | None:
    """A pre-training run (its latest checkpoint) or one checkpoint folder: the encoder."""
    if not ((path / "checkpoints").is_dir() or (path / "state.json").is_file()):
        return None
    checkpoint = find_checkpoint(path)
    state = json.loads((checkpoint / "state.json").read_text())
    return Source(
        checkpoint / "encoder",
        {
            "checkpoint": str(checkpoint.resolve()),
            "step": state["step"],
            "samples_seen": state.get("samples_seen"),
        },
    )


def model_folder_source(path: Path) -> Source | None:
    """A model folder of ours: a `config.json` saying aimv2-mlx beside its weights."""
    try:
        ours = json.loads((path / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return None
    return Source(path) if ours else None


SOURCES: list[Callable[[Path], Source | None]] = [run_source, model_folder_source]


def find_source(path: str | os.PathLike) -> Source:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such training run or model folder")
    for recognise in SOURCES:
        found = recognise(path)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"{path}: not a training run, checkpoint or aimv2-mlx model folder "
        "(convert other checkpoints with `aimv2 convert` first)"
    )


def export(
    source: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "mlx",
    name: str | None = None,
    upload_repo: str | None = None,
) -> Export:
    """Write `source` (a run, checkpoint or model folder) into the new folder `out` as `fmt`.

    mlx: config.json + model.safetensors in our layout. transformers: what
    `Aimv2VisionModel.from_pretrained` (LiT: `Aimv2Model`) loads. ml-aim: apple/ml-aim's PyTorch
    names. Each gets a model card stating the weights' history and licence; written atomically.
    """
    if fmt not in FORMATS:
        raise SettingError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    if is_lit_run(source):  # its LiT model folder first, then that folder in `fmt`
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.lit-") as scratch:
            folder = export_lit(source, Path(scratch) / "lit", name)
            return export(folder, out, fmt, name, upload_repo)
    found = find_source(source)
    if fmt == "mlx":
        config = _export_mlx(found, out, name)
        path, total = out, (out / "model.safetensors").stat().st_size
    else:
        checkpoint = open_checkpoint(found.folder)
        config, _ = conversion_plan(checkpoint, Location(found.folder, str(found.folder.resolve())))
        if config.quantization:
            raise CheckpointError(f"{found.folder}: quantized; export from the unquantized model")
        config.name = name or config.name
        config.source = {**config.source, **found.provenance}
        with atomic_folder(out) as tmp:
            total = write_format(checkpoint, config, tmp, fmt)
            (tmp / "README.md").write_text(model_card(config, fmt, out.name))
        path = out
    result = Export(path, fmt, config.name, total)
    if upload_repo:
        result.uploaded_to = upload(path, upload_repo)
    return result


def _export_mlx(found: Source, out: Path, name: str | None) -> ModelConfig:
    model = load(found.folder, dequantize=False)  # a quantized model stays as it is
    config = model.config
    config.name = name or config.name
    config.source = {**config.source, **found.provenance}
    with atomic_folder(out) as tmp:
        save(model, tmp)
        for file in TOKENIZER_FILES if config.is_lit else ():
            if (found.folder / file).is_file():
                shutil.copy2(found.folder / file, tmp / file)
        (tmp / "README.md").write_text(model_card(config, "mlx", out.name))
    return config


def export_encoder(
    run_or_checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    extra: dict | None = None,
) -> Path:
    """A run's (or checkpoint's) encoder as an MLX model folder; `extra` (e.g. probe scores) is
    added to its config's `source`, beside the run, step and samples seen."""
    found = run_source(Path(run_or_checkpoint).expanduser())
    if found is None:
        raise FileNotFoundError(f"{run_or_checkpoint}: not a training run or checkpoint folder")
    found.provenance.update(extra or {})
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    _export_mlx(found, out, name)
    return out
