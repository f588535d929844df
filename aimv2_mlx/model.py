"""Build, load and save models: local folders, the Hugging Face cache, or the bundled checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub.errors import HFValidationError
from mlx.utils import tree_flatten

from . import cpu, hub
from .base import Location, Model
from .checkpoint_io import Checkpoint, open_checkpoint
from .config import FORMAT, ML_AIM_REVISIONS, ModelConfig, check_config, family_of, official_name
from .cpu import on_cpu
from .encoder import VisionEncoder
from .errors import Aimv2Error
from .lit import LiT
from .quantize import dequantize_model, quantize_model
from .weights import (
    PICKLE_PATTERNS,
    CheckpointError,
    Recipe,
    check_config_matches,
    check_tensors,
    detect_layout,
    infer_config,
    plan,
    read_json,
)

DEFAULT_MODEL = "apple/aimv2-large-patch14-224"
BUNDLED_DIR = Path(__file__).parent / "assets" / "aimv2-tiny-shapes"
# What is fetched from the hub: configs, tokenizer files and safetensors weights. ml-aim's
# pinned revisions hold the same weights twice (torch and MLX files): the MLX copy is skipped.
HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
HUB_IGNORE = ["mlx_model.safetensors"]


class ModelNotFoundError(Aimv2Error, FileNotFoundError):
    """Neither a local folder nor something the Hugging Face hub (or its cache) could provide."""


class HubUnreachableError(ModelNotFoundError):
    """A hub id that is not cached, while the hub cannot be reached: the user is offline."""

    def __init__(self, repo: str, url: str):
        self.repo, self.url = repo, url
        super().__init__(
            f"{repo}: not in the Hugging Face cache and the hub ({url}) cannot be reached; work "
            "offline with the bundled model (-m bundled) or a local model folder, and set "
            "HF_HUB_OFFLINE=1 to skip the hub"
        )


def build(config: ModelConfig, location: Location | None = None) -> Model:
    """A randomly initialised model for `config` (LiT when it has a text tower).

    Quantized configs get their quantized linears; weights stay lazy until evaluated, so building
    even a 3B model only to read its parameter shapes costs no memory.
    """
    model = (LiT if config.is_lit else VisionEncoder)(config, location)
    if config.quantization:
        quantize_model(model, config.quantization["bits"], config.quantization["group_size"])
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def resolve(
    path_or_id: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False
) -> Location:
    """A local folder or file holding the checkpoint, fetched from the hub (or its cache) for hub
    ids.

    Official names (`apple/aimv2-…` or bare `aimv2-…`) default to ml-aim's pinned revision.
    """
    if str(path_or_id) == "bundled":
        return Location(BUNDLED_DIR, "bundled")
    path = Path(path_or_id).expanduser()
    if path.exists():
        return Location(path, str(path.resolve()))
    if path.suffix or str(path_or_id).startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{path_or_id}: no such model folder or file")
    official = official_name(str(path_or_id))
    repo = f"apple/{official}" if official else str(path_or_id)
    if "/" not in repo:
        raise ModelNotFoundError(
            f"{path_or_id}: no such folder, and not a hub id (owner/name) or an official AIMv2 name"
        )
    if revision is None and official:
        revision = ML_AIM_REVISIONS[official]
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (list(PICKLE_PATTERNS) if allow_pickle else [])
    download = dict(revision=revision, allow_patterns=patterns, ignore_patterns=HUB_IGNORE)
    try:
        folder = snapshot_download(repo, local_files_only=True, **download)
    except HFValidationError as exc:
        raise ModelNotFoundError(
            f"{path_or_id}: no such folder, and not a valid hub id ({exc})"
        ) from None
    except OSError:  # not in the cache: LocalEntryNotFoundError
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise ModelNotFoundError(
                f"{repo}: not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            ) from None
        if not hub.reachable(hub.endpoint()):
            raise HubUnreachableError(repo, hub.endpoint()) from None
        try:
            folder = snapshot_download(repo, **download)
        except OSError as exc:  # huggingface_hub's HTTP and connection errors are OSErrors
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(
                f"{repo}: not in the Hugging Face cache and the hub could not be reached ({reason})"
            ) from None
    return Location(Path(folder), f"hf://{repo}", revision)


def conversion_plan(
    checkpoint: Checkpoint, location: Location
) -> tuple[ModelConfig, dict[str, Recipe]]:
    """Our config and how to make each of our tensors, from names, shapes and any config.json.

    The config is checked field by field and against the checkpoint's tensor shapes before any
    model is built, so a config claiming 10^7 blocks or a 0-head attention is refused at once.
    """
    config_file, pre_file = (
        checkpoint.folder / "config.json",
        checkpoint.folder / "preprocessor_config.json",
    )
    config_json = read_json(config_file)
    if config_json is not None and not isinstance(config_json, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    ours = bool(config_json) and config_json.get("format") == FORMAT
    pre_json = None if ours else read_json(pre_file)

    def source_of(exc: Exception) -> Path:
        """The file a config field came from, to name it."""
        if pre_json is not None and "'preprocess" in str(exc):
            return pre_file
        return config_file if config_json else checkpoint.path

    try:
        if ours:
            config, recipes = (
                ModelConfig.from_dict(config_json),
                {key: Recipe((key,)) for key in checkpoint.tensors},
            )
        else:
            layout = detect_layout(checkpoint.tensors)
            recipes = plan(checkpoint.tensors, layout)
        shapes = {key: recipe.shape(checkpoint.tensors) for key, recipe in recipes.items()}
        if not ours:
            config = infer_config(shapes, config_json, pre_json, name=location.name)
    except CheckpointError as exc:  # from the tensors' names and shapes
        raise CheckpointError(f"{checkpoint.path}: {exc}") from None
    except (ValueError, TypeError) as exc:  # from a config file's values
        raise CheckpointError(f"{source_of(exc)}: {exc}") from None
    except KeyError as exc:
        raise CheckpointError(f"{checkpoint.path}: missing tensor {exc.args[0]!r}") from None
    try:
        check_config(config)
    except ValueError as exc:
        raise CheckpointError(f"{source_of(exc)}: {exc}") from None
    check_config_matches(config, shapes, checkpoint.path)
    if not ours:
        config.source = {
            "origin": location.origin,
            "revision": location.revision,
            "layout": layout,
            "file": checkpoint.path.name,
            "family": family_of(config.vision),
        }
    return config, recipes


def expected_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Our key -> the (lazy, never evaluated) parameter it must fill: shapes and dtypes."""
    return dict(tree_flatten(model.parameters()))


def load(
    path_or_id: str | os.PathLike = DEFAULT_MODEL,
    revision: str | None = None,
    dequantize: bool | None = None,
) -> Model:
    """Load a model from a local folder or file, or a hub id; PyTorch layouts are mapped in memory.

    Quantized models are dequantized into float32 linears on the CPU (`dequantize=None`), where
    quantized matmuls are slow; pass `dequantize=False` to keep them quantized. On the CPU the
    model gets the CPU backend (`cpu.apply`: vectorised kernels, every core).
    """
    location = resolve(path_or_id, revision)
    checkpoint = open_checkpoint(location.path)
    config, recipes = conversion_plan(checkpoint, location)
    model = build(config, location)  # the location: to load it again, and its tokenizer files
    check_tensors(
        expected_parameters(model),
        {k: r.shape(checkpoint.tensors) for k, r in recipes.items()},
        checkpoint.path,
    )
    model.load_weights(
        [
            (key, recipe.build(lambda k: checkpoint.tensors[k].load()))
            for key, recipe in recipes.items()
        ]
    )
    mx.eval(model.parameters())
    if config.quantization and (on_cpu() if dequantize is None else dequantize):
        dequantize_model(model)
    if on_cpu():
        cpu.apply(model)
    return model


def save(model: Model, folder: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` in our layout."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    mx.save_safetensors(
        str(folder / "model.safetensors"),
        dict(tree_flatten(model.parameters())),
        metadata={"format": "mlx"},
    )
    return folder


def load_default(verbose: bool = True) -> Model:
    """The official AIMv2-L when it can be had, else the small checkpoint bundled for offline
    use.
    """
    try:
        return load(DEFAULT_MODEL)
    except HubUnreachableError as exc:
        reason = f"{exc.repo}: not cached and the hub ({exc.url}) cannot be reached"
    except ModelNotFoundError as exc:
        reason = str(exc)
    if verbose:
        print(
            f"{reason}; using the bundled offline model {BUNDLED_DIR.name} (choose it with -m "
            "bundled; "
            "HF_HUB_OFFLINE=1 skips the hub)",
            file=sys.stderr,
            flush=True,
        )
    return load(BUNDLED_DIR)


def load_named(model: str) -> Model:
    """The model `-m/--model` names: "default" is `load_default()` (the official AIMv2-L, else
    the bundled model), anything else goes to `load()`."""
    return load_default() if model == "default" else load(model)
