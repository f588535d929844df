"""A user's mistake as one clear line on stderr and exit code 1; a bug keeps its traceback."""

from __future__ import annotations

import contextlib

from aimv2_mlx.errors import Aimv2Error

import click
import typer

# The library's domain errors, the system's (a full disk, a denied folder, a missing file) and a
# usage error raised inside a command body. Anything else (a ValueError, a KeyError) is a bug.
EXPECTED = (Aimv2Error, OSError, click.UsageError)


@contextlib.contextmanager
def one_line_errors():
    """Our errors and the system's as one line naming the file; other exceptions propagate."""
    try:
        yield
    except EXPECTED as exc:
        message = exc.format_message() if isinstance(exc, click.UsageError) else exc
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.filename}: {exc.strerror[0].lower()}{exc.strerror[1:]}"
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None
