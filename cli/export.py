"""`aimv2 export SRC OUT`: a run's encoder or a model folder, for MLX, transformers or ml-aim."""

from __future__ import annotations

from pathlib import Path

from aimv2_mlx.train.export import FORMATS
from aimv2_mlx.train.export import export as export_model

import typer

from .errors import one_line_errors
from .options import new_folder, one_of


def export(
    source: Path = typer.Argument(
        ...,
        help="Training run folder (its latest checkpoint), a checkpoint folder, "
        "or an aimv2-mlx model folder (LiT included).",
    ),
    out: Path = typer.Argument(..., help="Output model folder (must not exist)."),
    fmt: str = typer.Option(
        "mlx", "--format", help="mlx | transformers | ml-aim (PyTorch layouts, safetensors)."
    ),
    name: str = typer.Option(None, help="Model name recorded in config.json and the model card."),
    upload_repo: str = typer.Option(None, help="Upload the result to this Hugging Face repo."),
) -> None:
    """Export a model (a pre-training run's encoder: the decoder is dropped) for MLX or PyTorch."""
    with one_line_errors():
        one_of("--format", fmt, FORMATS)
        new_folder(out)
        result = export_model(source, out, fmt, name, upload_repo)
    typer.echo(
        f"wrote {result.path} ({result.name}, {result.format} layout, "
        f"{result.tensor_bytes / 1e6:,.1f} MB)"
    )
    if result.uploaded_to:
        typer.echo(f"uploaded to https://huggingface.co/{result.uploaded_to}")
