"""`aimv2 search QUERY --index INDEX`: the images of an index closest to a text or an example."""

from __future__ import annotations

import json
from pathlib import Path

from aimv2_mlx.contact_sheet import write_contact_sheet
from aimv2_mlx.errors import SettingError
from aimv2_mlx.index import open_index
from aimv2_mlx.model import load
from aimv2_mlx.search import search as run_search

import typer

from .errors import one_line_errors
from .options import expand, output_file


def search(
    query: str = typer.Argument(
        None, help="Text to search for (needs an index made with a LiT model)."
    ),
    index: Path = typer.Option(Path("index"), "--index", help="Index folder made by aimv2 index."),
    image: Path = typer.Option(
        None,
        "--image",
        help="Search by example: images like this one (any encoder); "
        "with QUERY too, a mixed query.",
    ),
    k: int = typer.Option(20, "-k", help="Results shown."),
    model: str = typer.Option(
        None, "-m", "--model", help="The index's model, if it has moved since indexing."
    ),
    ann: bool = typer.Option(
        False,
        "--ann",
        help="Approximate search (an HNSW graph; needs the ann extra, usearch).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"results": [{"path", "score"}, ...]}.'
    ),
    html: Path = typer.Option(
        None, "--html", help="Also write a contact sheet (thumbnails, scores, paths)."
    ),
) -> None:
    """Search an index; prints score and path of the best k files, best first."""
    index, image, html = expand(index), expand(image), expand(html)
    with one_line_errors():
        if k < 1:
            raise SettingError(f"-k {k}: must be at least 1")
        if html is not None:
            output_file(html, "--html")
        if image is not None and not image.is_file():
            raise FileNotFoundError(f"--image {image}: no such file")
        opened = open_index(index)
        try:
            results = run_search(
                opened,
                text=query,
                image=image,
                k=k,
                model=load(model) if model else None,
                backend="ann" if ann else "exact",
            )
        except ImportError as exc:  # --ann without its extra: say how to install it
            raise SettingError(str(exc)) from None
        if html is not None:
            title = " + ".join(
                part
                for part in (f"“{query}”" if query else None, f"like {image}" if image else "")
                if part
            )
            write_contact_sheet(html, opened, [("", results)], f"aimv2 search: {title}")
    print_results(results, as_json, "results")


def print_results(results: list, as_json: bool, key: str) -> None:
    """`{"results": [...]}` on stdout, or one `score  path` line per result."""
    if as_json:
        typer.echo(json.dumps({key: [r.to_dict() for r in results]}, ensure_ascii=False))
        return
    for result in results:
        typer.echo(f"{result.score:.4f}  {result.path}")
