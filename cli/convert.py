"""`aimv2 convert SRC OUT`: any supported checkpoint to an aimv2-mlx folder."""

from __future__ import annotations

from pathlib import Path

import typer

from aimv2_mlx.convert import convert as convert_checkpoint

from .errors import one_line_errors


def convert(
    source: str = typer.Argument(..., help="Checkpoint folder or hub id."),
    output: Path = typer.Argument(..., help="Output folder (must not exist)."),
    revision: str = typer.Option(None, help="Hub revision."),
) -> None:
    """Convert a PyTorch (transformers / ml-aim / timm) or ml-aim MLX checkpoint to our layout."""
    with one_line_errors():
        path = convert_checkpoint(source, output, revision=revision)
    typer.echo(f"wrote {path}")
