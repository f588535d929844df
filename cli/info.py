"""`aimv2 info MODEL`: config, parameter count and the numerical backend in use."""

from __future__ import annotations

import json

import typer

from aimv2_mlx.cpu import blas as backend
from aimv2_mlx.model import describe_model

from .errors import one_line_errors


def info(
    model: str = typer.Argument("bundled", help="Model folder, hub id (apple/aimv2-…), or 'bundled'."),
    revision: str = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a model's config and parameter count, and which device and BLAS MLX is using."""
    with one_line_errors():
        summary = describe_model(model, revision)
    summary["backend"] = backend.describe()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key in ("name", "origin", "kind", "parameters", "label", "trained"):
        if summary.get(key) is not None:
            typer.echo(f"{key:>12}: {summary[key]}")
    typer.echo(f"{'config':>12}: {json.dumps(summary['config'])}")
    width = max(12, *(len(key) for key in summary["backend"]))
    for key, value in summary["backend"].items():
        if key != "warning":
            typer.echo(f"{key:>{width}}: {value}")
    if "warning" in summary["backend"]:
        typer.echo(f"warning: {summary['backend']['warning']}", err=True)
