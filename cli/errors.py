"""Turn expected failures into one clear line on stderr and exit code 1."""

from __future__ import annotations

import contextlib

import typer

from aimv2_mlx.folders import DiskFullError, FolderInUseError
from aimv2_mlx.images import ImageError
from aimv2_mlx.model import ModelNotFoundError
from aimv2_mlx.weights import CheckpointError

EXPECTED = (ModelNotFoundError, CheckpointError, ImageError, OSError, ValueError, KeyError, FolderInUseError)


@contextlib.contextmanager
def one_line_errors():
    """Our errors and the system's (a full disk, a denied folder) as one line naming the file."""
    try:
        yield
    except EXPECTED as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.filename}: {exc.strerror[0].lower()}{exc.strerror[1:]}"
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None
