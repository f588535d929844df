"""`aimv2 info MODEL`: config, parameter count and the numerical backend in use."""

from __future__ import annotations

import json
import textwrap

from aimv2_mlx.cpu import blas as backend
from aimv2_mlx.describe import describe_model
from aimv2_mlx.errors import SettingError
from aimv2_mlx.lit_tuning import is_lit_run

import typer

from .errors import one_line_errors

WIDTH = 100


def info(
    model: str = typer.Argument(
        "bundled",
        help="Model folder, hub id (apple/aimv2-…), 'bundled', or a "
        "pre-training run folder (its latest checkpoint).",
    ),
    revision: str = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a model's config, size and quantization, and MLX's device and BLAS."""
    with one_line_errors():
        if is_lit_run(model):
            raise SettingError(
                f"{model}: a LiT-tuning run; `aimv2 export {model} OUT` writes its LiT "
                "model folder, which `aimv2 info OUT` describes"
            )
        summary = describe_model(model, revision)
    summary["backend"] = backend.describe()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    rows = {
        "name": summary["name"],
        "origin": summary["origin"],
        "kind": summary["kind"],
        "parameters": f"{summary['parameters']:,}",
        "quantization": summary["quantization"] or "none",
        "label": summary["label"],
        "trained": summary["trained"],
    }
    for key, value in rows.items():
        if value is not None:
            echo_row(key, value, 12)
    typer.echo(f"{'config':>12}:")
    for key, value in config_rows(summary["config"]):
        echo_row(key, value, 16)
    width = max(12, *(len(key) for key in summary["backend"]))
    for key, value in summary["backend"].items():
        if key != "warning":
            typer.echo(f"{key:>{width}}: {value}")
    if "run" in summary:
        typer.echo(
            f"this is a training run: `{summary['run']['export']}` writes its encoder as a model "
            "folder "
            "for embed, probe and classify"
        )
    if "warning" in summary["backend"]:
        typer.echo(f"warning: {summary['backend']['warning']}", err=True)


def config_rows(config: dict) -> list[tuple[str, str]]:
    """One row per section of the config: its fields as `key=value`; `source` is left to the rows
    above it (origin, label, trained) and to --json."""
    rows = [("format", f"{config['format']} v{config['format_version']}")]
    scalars = []
    for key, value in config.items():
        if key in ("format", "format_version", "name", "source"):
            continue
        if isinstance(value, dict):
            rows.append((key, " ".join(f"{k}={_compact(v)}" for k, v in value.items())))
        else:
            scalars.append(f"{key}={_compact(value)}")
    return rows + [("other", " ".join(scalars))] if scalars else rows


def _compact(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return "none" if value is None else str(value)


def echo_row(key: str, value: str, indent: int) -> None:
    """`key: value`, the key right-aligned in `indent` columns, long values wrapped under the
    value.
    """
    lines = textwrap.wrap(str(value), WIDTH - indent - 2, break_on_hyphens=False) or [""]
    typer.echo(f"{key:>{indent}}: {lines[0]}")
    for line in lines[1:]:
        typer.echo(" " * (indent + 2) + line)
