"""`aimv2 convert SRC OUT`: any supported checkpoint to an aimv2-mlx folder."""

from __future__ import annotations

import json
from pathlib import Path

from aimv2_mlx.convert import convert as convert_checkpoint

import typer

from .errors import one_line_errors
from .options import above_zero, at_least, new_folder, one_of


def convert(
    source: str = typer.Argument(
        ..., help="Checkpoint folder or file, or a hub id (apple/aimv2-…)."
    ),
    output: Path = typer.Argument(..., help="Output folder (must not exist)."),
    revision: str = typer.Option(
        None, help="Hub revision; official names default to ml-aim's pinned one."
    ),
    dtype: str = typer.Option(None, help="float32 | float16 | bfloat16 (default: as stored)."),
    q_bits: int = typer.Option(
        None, "-q", "--q-bits", help="Quantize the transformer linears to 4 or 8 bits."
    ),
    q_group_size: int = typer.Option(64, help="Quantization group size."),
    max_shard_size: float = typer.Option(5.0, help="Largest output shard, in GB."),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="Also download *.bin/*.pth from the hub (read without torch, safely).",
    ),
    name: str = typer.Option(None, help="Model name to record (default: inferred)."),
    num_heads: int = typer.Option(
        None, help="Vision attention heads (default: config.json or the AIMv2 family)."
    ),
    text_num_heads: int = typer.Option(None, help="LiT text attention heads."),
    image_size: int = typer.Option(
        None, help="Image size (native models: the default preprocessing size)."
    ),
    preprocess: str = typer.Option(
        None, help="clip | ml-aim | native (default: from the checkpoint)."
    ),
    verify: bool = typer.Option(
        False, "--verify", help="Compare with transformers' PyTorch model (needs torch)."
    ),
    upload_repo: str = typer.Option(None, help="Upload the result to this Hugging Face repo."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary."),
) -> None:
    """Convert a PyTorch (transformers, ml-aim, timm, ml-l3m) or ml-aim MLX checkpoint to ours."""
    with one_line_errors():
        one_of("--q-bits", q_bits, (4, 8))
        one_of("--q-group-size", q_group_size, (32, 64, 128))
        above_zero(max_shard_size=max_shard_size)
        at_least(1, num_heads=num_heads, text_num_heads=text_num_heads, image_size=image_size)
        new_folder(output, "OUTPUT")
        result = convert_checkpoint(
            source,
            output,
            revision=revision,
            dtype=dtype,
            q_bits=q_bits,
            q_group_size=q_group_size,
            max_shard_bytes=int(max_shard_size * 1e9),
            allow_pickle=allow_pickle,
            name=name,
            num_heads=num_heads,
            text_num_heads=text_num_heads,
            image_size=image_size,
            preprocess=preprocess,
            verify=verify,
            upload_repo=upload_repo,
        )
    config = result.config
    summary = {
        "path": str(result.path),
        "name": config.name,
        "layout": config.source.get("layout", "aimv2-mlx"),
        "shards": result.shards,
        "bytes": result.tensor_bytes,
        "quantization": config.quantization,
        "verify": result.verification,
        "uploaded_to": result.uploaded_to,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"wrote {result.path} ({config.name}, from the {summary['layout']} layout, "
        f"{len(result.shards)} shard(s), {result.tensor_bytes / 1e6:,.1f} MB)"
    )
    check = result.verification
    if check and "skipped" in check:
        typer.echo(f"verify: skipped: {check['skipped']}")
    elif check:
        typer.echo(
            f"verify: max abs difference {check['max_abs_diff']:.3g}, cosine similarity "
            f"{check['cosine']:.8f} ({check['compared']} vs {check['reference']})"
        )
    if result.uploaded_to:
        typer.echo(f"uploaded to https://huggingface.co/{result.uploaded_to}")
