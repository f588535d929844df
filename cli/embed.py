"""`aimv2 embed FOLDER`: every image under a folder to one vector each."""

from __future__ import annotations

from pathlib import Path

import typer

from aimv2_mlx.embed import embed_folder
from aimv2_mlx.model import load, load_default

from .errors import one_line_errors


def embed(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    output: Path = typer.Option(Path("embeddings"), "-o", "--output", help="Output folder."),
    model: str = typer.Option("default", "-m", "--model",
                              help="Model folder or hub id; 'default' is apple/aimv2-large-patch14-224, "
                                   "falling back to the bundled offline model."),
    batch_size: int = typer.Option(8, "-b", "--batch-size"),
    pool: str = typer.Option("mean", help="mean | tokens | head"),
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalise the vectors."),
) -> None:
    """Embed a folder of images; writes embeddings.npy, paths.txt and manifest.json."""
    with one_line_errors():
        encoder = load_default() if model == "default" else load(model)
        path = embed_folder(folder, output, encoder, batch_size=batch_size, pool=pool, normalize=normalize)
    typer.echo(f"wrote {path} ({encoder.model_config.name})")
