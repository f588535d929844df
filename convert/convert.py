"""Convert any AIMv2 checkpoint (folder, file or hub id) into an aimv2-mlx folder.

Streaming: the plan (layout, key map, config, every output tensor's shape and dtype) is made
from the checkpoint's headers alone and checked against the model before anything is written;
then each output tensor is read, mapped, cast (and quantized) and written on its own, so memory
holds about one tensor, whatever the model's size. The folder is built in a temporary sibling
and renamed into place at the end: a failure leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from aimv2_mlx import __version__
from aimv2_mlx.checkpoint_io import INDEX, open_checkpoint
from aimv2_mlx.config import ModelConfig, PreprocessConfig, check_config
from aimv2_mlx.errors import SettingError
from aimv2_mlx.folders import atomic_folder
from aimv2_mlx.hub import upload
from aimv2_mlx.model import build, conversion_plan, expected_parameters, resolve
from aimv2_mlx.quantize import QUANTIZED_MODULES, quantize_weight
from aimv2_mlx.safetensors_io import NUMPY_OF, write_streaming
from aimv2_mlx.weights import CheckpointError, check_config_matches, check_tensors

import mlx.core as mx
import mlx.nn as nn

from .verify import verify_conversion

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
COPIED = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


@dataclass
class Conversion:
    """What `convert()` wrote."""

    path: Path
    config: ModelConfig
    shards: list[str]
    tensor_bytes: int
    verification: dict | None = None
    uploaded_to: str | None = None


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    q_bits: int | None = None,
    q_group_size: int = 64,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_pickle: bool = False,
    name: str | None = None,
    num_heads: int | None = None,
    text_num_heads: int | None = None,
    image_size: int | None = None,
    preprocess: str | None = None,
    verify: bool = False,
    upload_repo: str | None = None,
) -> Conversion:
    """Convert `source` into an aimv2-mlx folder at `output` (which must not exist).

    `dtype` (float32 | float16 | bfloat16) casts every floating tensor; None keeps each as stored.
    `q_bits` (4 | 8) quantizes the transformer linears with `q_group_size`. The flags `name`,
    `num_heads`, `text_num_heads`, `image_size` and `preprocess` override what is inferred.
    """
    output = Path(output).expanduser()
    if output.exists():
        raise FileExistsError(f"{output}: already exists")
    if dtype is not None and dtype not in DTYPES:
        raise SettingError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    location = resolve(source, revision, allow_pickle=allow_pickle)
    checkpoint = open_checkpoint(location.path)
    config, recipes = conversion_plan(checkpoint, location)
    if config.quantization:
        raise CheckpointError(
            f"{checkpoint.path}: already quantized; convert from the unquantized checkpoint"
        )
    _override(config, name, num_heads, text_num_heads, image_size, preprocess)
    try:
        check_config(config)
    except ValueError as exc:
        raise SettingError(f"{checkpoint.path} with the options given: {exc}") from None
    shapes = {k: r.shape(checkpoint.tensors) for k, r in recipes.items()}
    # before building: the flags may change sizes
    check_config_matches(config, shapes, checkpoint.path)
    check_tensors(expected_parameters(build(config)), shapes, checkpoint.path)
    options = {
        "dtype": dtype or "as stored",
        "q_bits": q_bits,
        "q_group_size": q_group_size if q_bits else None,
    }
    config.source = {
        **config.source,
        "converter": f"aimv2-mlx {__version__}",
        "conversion": options,
    }
    if q_bits:
        config.quantization = {
            "bits": q_bits,
            "group_size": q_group_size,
            "mode": "affine",
            "modules": QUANTIZED_MODULES,
        }
    out_model = build(config)
    specs = _output_specs(out_model, recipes, checkpoint, dtype)

    with atomic_folder(output) as tmp:
        dtypes = {key: dtype for key, _, dtype in specs}
        shards, total = _write_shards(
            tmp, specs, _producer(out_model, recipes, checkpoint, dtypes), max_shard_bytes
        )
        config.save(tmp)
        for copied in COPIED:
            if (checkpoint.folder / copied).is_file():
                shutil.copy2(checkpoint.folder / copied, tmp / copied)
        if not (tmp / "preprocessor_config.json").exists():
            (tmp / "preprocessor_config.json").write_text(
                json.dumps(config.preprocess.to_hub(), indent=2) + "\n"
            )
        (tmp / "README.md").write_text(_model_card(config, output.name))
    result = Conversion(output, config, shards, total)
    if verify:
        result.verification = verify_conversion(output, checkpoint, recipes)
    if upload_repo:
        result.uploaded_to = upload(output, upload_repo)
    return result


def _override(config, name, num_heads, text_num_heads, image_size, preprocess) -> None:
    if name:
        config.name = name
    if num_heads is not None:
        config.vision.num_attention_heads = num_heads
    if text_num_heads is not None:
        if not config.is_lit:
            raise SettingError(
                "--text-num-heads applies only to LiT checkpoints (this one has no text tower)"
            )
        config.text.num_attention_heads = text_num_heads
    if image_size is not None:
        config.vision.image_size = image_size
        config.preprocess.size = image_size
    if preprocess:
        config.preprocess = PreprocessConfig.for_mode(preprocess, config.vision.image_size)


def _output_specs(
    model, recipes, checkpoint, dtype: str | None
) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of every tensor to write, in key order."""
    specs = []
    for key, param in sorted(expected_parameters(model).items()):
        source_key = key if key in recipes else key.rsplit(".", 1)[0] + ".weight"  # scales/biases
        stored = checkpoint.tensors[recipes[source_key].sources[0]].dtype
        if param.dtype == mx.uint32:  # packed quantized weight
            out_dtype = "uint32"
        elif NUMPY_OF[stored].kind == "f" or stored == "bfloat16":
            out_dtype = dtype or stored
        else:
            out_dtype = stored
        specs.append((key, tuple(param.shape), out_dtype))
    return specs


def _producer(model, recipes, checkpoint, dtypes: dict[str, str]):
    """produce(key) -> the output tensor, read and mapped from the checkpoint on demand.

    A quantized linear's three tensors (weight, scales, biases) come from one quantization of
    its source weight, done at the first of them and kept until the other two are written.
    """
    quantized = {path: m for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    pending: dict[str, dict[str, mx.array]] = {}

    def read(source_key: str) -> mx.array:
        return checkpoint.tensors[source_key].load()

    def produce(key: str) -> mx.array:
        module, _, part = key.rpartition(".")
        if module not in quantized:
            return recipes[key].build(read).astype(getattr(mx, dtypes[key]))
        if module not in pending:
            weight = (
                recipes[module + ".weight"]
                .build(read)
                .astype(getattr(mx, dtypes[module + ".scales"]))
            )
            pending[module] = quantize_weight(
                weight, quantized[module].bits, quantized[module].group_size
            )
        value = pending[module].pop(part)
        if not pending[module]:
            del pending[module]
        return value

    return produce


def _write_shards(folder: Path, specs, produce, max_shard_bytes: int) -> tuple[list[str], int]:
    """Contiguous groups of tensors, each at most `max_shard_bytes` (a lone larger tensor aside)."""
    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * NUMPY_OF[spec[2]].itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    total = 0
    for shard, group in zip(names, groups, strict=True):
        total += write_streaming(folder / shard, group, produce, metadata={"format": "mlx"})
    if len(names) > 1:
        weight_map = {
            key: shard for shard, group in zip(names, groups, strict=True) for key, _, _ in group
        }
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names, total


def _model_card(config, folder_name: str) -> str:
    source, quant = config.source, config.quantization
    kind = "LiT (image + text) model" if config.is_lit else "vision encoder"
    revision = f" at revision `{source['revision']}`" if source.get("revision") else ""
    bits = (
        f"{quant['bits']}-bit, group size {quant['group_size']} ({quant['modules']})"
        if quant
        else "none"
    )
    return "\n".join(
        [
            f"# {config.name} (aimv2-mlx)",
            "",
            f"AIMv2 {kind} converted to MLX by aimv2-mlx from `{source.get('origin')}`{revision}.",
            "",
            f"- converted from the {source.get('layout', 'aimv2-mlx')} layout",
            f"- dtype: {source['conversion']['dtype']}",
            f"- quantization: {bits}",
            "",
            "```python",
            "import aimv2_mlx",
            f'model = aimv2_mlx.load("{folder_name}")',
            "```",
            "",
        ]
    )
