"""Turn expected failures into one clear line on stderr and exit code 1."""

from __future__ import annotations

import contextlib

import typer

from aimv2_mlx.folders import DiskFullError, FolderInUseError
from aimv2_mlx.images import ImageError
from aimv2_mlx.model import ModelNotFoundError
from aimv2_mlx.weights import CheckpointError

EXPECTED = (ModelNotFoundError, CheckpointError, ImageError, FileNotFoundError, FileExistsError, ValueError,
            KeyError, NotADirectoryError, PermissionError, FolderInUseError, DiskFullError)


@contextlib.contextmanager
def one_line_errors():
    try:
        yield
    except EXPECTED as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None
