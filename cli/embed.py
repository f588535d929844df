"""`aimv2 embed INPUT... -o OUT`: folders, file lists or WebDataset tars to sharded vectors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from aimv2_mlx import distributed
from aimv2_mlx.embed import embed_folder
from aimv2_mlx.images import DEFAULT_MAX_MEGAPIXELS, check_megapixel_limit
from aimv2_mlx.model import load_named

import typer

from .errors import one_line_errors
from .options import at_least, existing, expand, output_folder


def embed(
    inputs: list[Path] = typer.Argument(
        ...,
        help="Image files, folders (searched recursively), file lists "
        "(one path a line) or WebDataset .tar shards.",
    ),
    output: Path = typer.Option(Path("embeddings"), "-o", "--output", help="Output folder."),
    model: str = typer.Option(
        "default",
        "-m",
        "--model",
        help="Model folder or hub id; 'default' is apple/aimv2-large-patch14-224, "
        "falling back to the bundled offline model.",
    ),
    batch_size: int = typer.Option(8, "-b", "--batch-size", help="Images per forward pass."),
    shard_size: int = typer.Option(
        1000, "--shard-size", help="Images per output shard (the unit of resume)."
    ),
    pool: str = typer.Option("mean", help="mean | tokens | head"),
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalise the vectors."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype: float32 | float16."),
    fmt: str = typer.Option("npy", "--format", help="Embeddings as npy | safetensors | parquet."),
    max_megapixels: float = typer.Option(
        DEFAULT_MAX_MEGAPIXELS,
        "--max-megapixels",
        help="Larger images are listed as failures (decompression bombs); at most Pillow's limit.",
    ),
    workers: int = typer.Option(
        0, "--workers", help="Decoding threads (0: up to 4, one per core)."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace outputs an earlier run here made with other "
        "settings (only the files its manifest lists).",
    ),
    strict: bool = typer.Option(False, "--strict", help="Exit with 1 if any image failed."),
    as_json: bool = typer.Option(
        False, "--json", help="Print a machine-readable summary on stdout."
    ),
) -> None:
    """Embed images into OUT: shard-*.npy + shard-*.parquet, failures.jsonl, manifest.json."""
    inputs, output = [expand(path) for path in inputs], expand(output)
    rank, _ = distributed.rank_and_size()
    with one_line_errors():
        at_least(1, batch_size=batch_size, shard_size=shard_size)
        at_least(0, workers=workers)
        check_megapixel_limit(max_megapixels, "--max-megapixels")
        existing(*inputs)
        output_folder(output)
        encoder = load_named(model)
        with progress_bar(enabled=rank == 0) as progress:
            summary = embed_folder(
                inputs,
                output,
                encoder,
                batch_size=batch_size,
                shard_size=shard_size,
                pool=pool,
                normalize=normalize,
                dtype=dtype,
                format=fmt,
                max_megapixels=max_megapixels,
                workers=workers,
                overwrite=overwrite,
                progress=progress,
            )
    if rank == 0:
        report_failures(output / "failures.jsonl")
        if as_json:
            typer.echo(json.dumps(summary.to_dict()))
        else:
            typer.echo(
                f"embedded {summary.embedded} of {summary.images} images into {output}/ "
                f"({summary.failed} failed, listed in failures.jsonl; {summary.shards_reused} of "
                f"{summary.shards} shards reused; {summary.model})"
            )
    if summary.embedded == 0 or (strict and summary.failed):
        raise typer.Exit(1)


def report_failures(path: Path, shown: int = 20) -> None:
    """One line per failed file on stderr (the first `shown`; all of them are in failures.jsonl)."""
    lines = path.read_text().splitlines()
    for line in lines[:shown]:
        failure = json.loads(line)
        typer.echo(f"skipped {failure['path']}: {failure['reason']}", err=True)
    if len(lines) > shown:
        typer.echo(f"... and {len(lines) - shown} more in {path}", err=True)


@contextlib.contextmanager
def progress_bar(enabled: bool):
    """A rich progress bar on stderr (images/s, ETA, failures); yields the callback embed_folder
    calls.
    """
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[failed]} failed"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = None

        def update(done: int, total: int, failed: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("embed", total=total, rate="", failed=0)
            bar.update(task, completed=done, failed=failed)
            speed = bar.tasks[task].speed
            bar.update(task, rate=f"{speed:.2f} img/s" if speed else "")

        yield update
