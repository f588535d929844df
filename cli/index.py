"""`aimv2 index PATH... -o INDEX`: a search index of folders that stays current as they change."""

from __future__ import annotations

import json
from pathlib import Path

from aimv2_mlx.images import DEFAULT_MAX_MEGAPIXELS, check_megapixel_limit
from aimv2_mlx.index import is_index, open_index, update_index
from aimv2_mlx.model import load_named

import typer

from .embed import progress_bar, report_failures
from .errors import one_line_errors
from .options import at_least, existing, expand, output_folder


def index(
    inputs: list[Path] = typer.Argument(
        ..., help="Image files, folders (searched recursively) or file lists."
    ),
    output: Path = typer.Option(
        Path("index"), "-o", "--output", help="Index folder (made, or updated)."
    ),
    model: str = typer.Option(
        None,
        "-m",
        "--model",
        help="Model folder or hub id (default: an existing index's own model, else "
        "'default' as in aimv2 embed). A LiT model enables text search.",
    ),
    batch_size: int = typer.Option(8, "-b", "--batch-size", help="Images per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype: float32 | float16."),
    max_megapixels: float = typer.Option(
        DEFAULT_MAX_MEGAPIXELS,
        "--max-megapixels",
        help="Larger images are listed as failures (decompression bombs).",
    ),
    workers: int = typer.Option(
        0, "--workers", help="Decoding threads (0: up to 4, one per core)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the counts as one JSON object on stdout."
    ),
) -> None:
    """Index images for search and dupes; a re-run embeds only new and changed files."""
    inputs, output = [expand(path) for path in inputs], expand(output)
    with one_line_errors():
        at_least(1, batch_size=batch_size)
        at_least(0, workers=workers)
        check_megapixel_limit(max_megapixels, "--max-megapixels")
        existing(*inputs)
        output_folder(output)
        if model is None and is_index(output):
            model = open_index(output).model.get("path")
        encoder = load_named(model or "default")
        try:
            with progress_bar(enabled=True) as progress:
                summary = update_index(
                    inputs,
                    output,
                    encoder,
                    batch_size=batch_size,
                    dtype=dtype,
                    max_megapixels=max_megapixels,
                    workers=workers,
                    progress=progress,
                )
        except KeyboardInterrupt:
            typer.echo(
                f"interrupted; the files embedded so far are saved in {output}: "
                "run the same command "
                "again to continue",
                err=True,
            )
            raise typer.Exit(130) from None
    report_failures(output / "failures.jsonl")
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    else:
        typer.echo(
            f"indexed {summary.total} images in {output}/: {summary.embedded} embedded, "
            f"{summary.reused} reused ({summary.moved} found moved), {summary.removed} removed, "
            f"{summary.failed} failed "
            f"(listed in failures.jsonl); {summary.model}"
        )
