"""`aimv2 data shapes OUT`: the procedural captioned dataset (smoke test and benchmark)."""

from __future__ import annotations

from pathlib import Path

from aimv2_mlx.data.shapes import MIN_SIZE, write_shapes

import typer

from .errors import one_line_errors
from .options import at_least, new_folder

app = typer.Typer(no_args_is_help=True, help="Generate datasets.")


@app.command("shapes")
def shapes(
    out: Path = typer.Argument(..., help="Output folder (must not exist)."),
    n: int = typer.Option(1000, "--n", help="Number of images."),
    size: int = typer.Option(112, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Image i depends only on (seed, i)."),
) -> None:
    """Coloured shapes on textured backgrounds, with captions and attribute labels."""
    with one_line_errors():
        at_least(1, n=n)
        at_least(MIN_SIZE, size=size)
        new_folder(out)
        path = write_shapes(out, n, size, seed)
    typer.echo(f"wrote {n} images to {path}")
