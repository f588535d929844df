"""`aimv2 export RUN OUT`: the trained encoder alone, as a model folder embed/probe can load."""

from __future__ import annotations

from pathlib import Path

import typer

from aimv2_mlx.lit_tuning import export_lit, is_lit_run
from aimv2_mlx.train.export import export_encoder

from .errors import one_line_errors
from .options import new_folder


def export(
    run: Path = typer.Argument(..., help="Training or LiT run folder (its latest checkpoint) or a checkpoint folder."),
    out: Path = typer.Argument(..., help="Output model folder (must not exist)."),
    name: str = typer.Option(None, help="Model name recorded in config.json."),
) -> None:
    """Export the encoder of a pre-training checkpoint (the decoder is dropped), or a LiT run."""
    with one_line_errors():
        new_folder(out)
        path = export_lit(run, out, name) if is_lit_run(run) else export_encoder(run, out, name)
    typer.echo(f"wrote {path}")
