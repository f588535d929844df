"""Build, load and save models: local folders, the Hugging Face cache, or the bundled checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .encoder import VisionEncoder
from .lit import LiT
from .weights import CheckpointError, infer_config, read_checkpoint, read_json, to_ours

DEFAULT_MODEL = "apple/aimv2-large-patch14-224"
BUNDLED_DIR = Path(__file__).parent / "assets" / "aimv2-tiny-random"
HUB_PATTERNS = ["*.json", "model.safetensors", "model-*.safetensors", "*.txt"]


class ModelNotFoundError(FileNotFoundError):
    """Neither a local folder nor something the Hugging Face hub (or its cache) could provide."""


def build(config: ModelConfig) -> nn.Module:
    """A randomly initialised model for `config` (LiT when it has a text tower)."""
    model = LiT(config) if config.is_lit else VisionEncoder(config.vision)
    model.model_config = config
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> tuple[Path, str]:
    """A local folder holding the checkpoint, and a description of where it came from."""
    if str(path_or_id) == "bundled":
        return BUNDLED_DIR, "bundled"
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path, str(path.resolve())
    if path.suffix or str(path_or_id).startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{path_or_id}: no such model folder")
    repo = str(path_or_id)
    if "/" not in repo:
        repo = f"apple/{repo}"
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise ModelNotFoundError(f"{repo}: not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
        try:
            folder = snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(
                f"{repo}: not in the Hugging Face cache and the hub could not be reached ({reason})"
            ) from None
    return Path(folder), f"hf://{repo}" + (f"@{revision}" if revision else "")


def load(path_or_id: str | os.PathLike = DEFAULT_MODEL, revision: str | None = None) -> nn.Module:
    """Load a model from a local folder or a hub id; PyTorch layouts are converted in memory."""
    folder, origin = resolve(path_or_id, revision)
    config_json = read_json(folder / "config.json")
    weights, weights_file = read_checkpoint(folder)
    if config_json and config_json.get("format") == "aimv2-mlx":
        config = ModelConfig.from_dict(config_json)
    else:
        weights = to_ours(weights)
        config = infer_config(weights, config_json, read_json(folder / "preprocessor_config.json"),
                              name=folder.name if origin.startswith("/") else origin.split("://")[-1])
        config.source = {"origin": origin, "revision": revision, "converted_from": "pytorch layout"}
    model = build(config)
    _assign(model, weights, weights_file)
    return model


def _assign(model: nn.Module, weights: dict[str, mx.array], origin: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    extra = sorted(weights.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{origin}: missing tensor {missing[0]!r}" + _more(missing))
    if extra:
        raise CheckpointError(f"{origin}: unexpected tensor {extra[0]!r}" + _more(extra))
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{origin}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def save(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` in our layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.model_config.save(folder)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    return folder


def load_default(verbose: bool = True) -> nn.Module:
    """The official AIMv2-L when it can be had, else the small checkpoint bundled for offline use."""
    try:
        return load(DEFAULT_MODEL)
    except ModelNotFoundError as exc:
        if verbose:
            print(f"{exc}; using the bundled offline model {BUNDLED_DIR.name}", flush=True)
        return load(BUNDLED_DIR)


def describe_model(path_or_id: str | os.PathLike, revision: str | None = None) -> dict:
    """What `aimv2 info` reports about a model: name, origin, size and config."""
    model = load(path_or_id, revision)
    config = model.model_config
    return {
        "name": config.name,
        "origin": config.source.get("origin", str(path_or_id)),
        "kind": "LiT (image + text)" if config.is_lit else "vision encoder",
        "parameters": f"{parameter_count(model):,}",
        "label": config.source.get("label"),
        "config": config.to_dict(),
    }
