"""`aimv2 dupes --index INDEX`: groups of near-duplicate images, largest first."""

from __future__ import annotations

import json
from pathlib import Path

from aimv2_mlx.contact_sheet import write_contact_sheet
from aimv2_mlx.dupes import DEFAULT_THRESHOLD, find_duplicates
from aimv2_mlx.index import open_index

import typer

from .errors import one_line_errors
from .options import expand, output_file


def dupes(
    index: Path = typer.Option(Path("index"), "--index", help="Index folder made by aimv2 index."),
    threshold: float = typer.Option(
        DEFAULT_THRESHOLD,
        "--threshold",
        help="Cosine similarity at or above which two images count as duplicates.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"groups": [[{"path", "score"}, ...], ...]}.'
    ),
    html: Path = typer.Option(
        None, "--html", help="Also write a contact sheet, one section per group."
    ),
) -> None:
    """Find near-duplicates in an index; each group's scores are similarities to its first file."""
    index, html = expand(index), expand(html)
    with one_line_errors():
        if html is not None:
            output_file(html, "--html")
        opened = open_index(index)
        groups = find_duplicates(opened, threshold)
        if html is not None:
            sections = [
                (f"group {i + 1}: {len(group)} files", group) for i, group in enumerate(groups)
            ]
            write_contact_sheet(html, opened, sections, f"aimv2 dupes: cosine ≥ {threshold}")
    if as_json:
        typer.echo(
            json.dumps(
                {"groups": [[r.to_dict() for r in group] for group in groups]}, ensure_ascii=False
            )
        )
        return
    for i, group in enumerate(groups):
        typer.echo(f"group {i + 1} ({len(group)} files):")
        for result in group:
            typer.echo(f"  {result.score:.4f}  {result.path}")
    if not groups:
        typer.echo(f"no near-duplicates at cosine ≥ {threshold} among {len(opened.paths)} images")
