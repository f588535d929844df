"""`aimv2 tokenizer train DATA -o tokenizer.json`: a BPE over a dataset's captions."""

from __future__ import annotations

from pathlib import Path

from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.tokenizer import train_tokenizer

import typer

from .errors import one_line_errors
from .options import at_least, expand, output_file

app = typer.Typer(no_args_is_help=True, help="Caption tokenizers.")


@app.command("train")
def train(
    data: Path = typer.Argument(
        ..., help="Captioned data: folder with .txt sidecars, .jsonl/.csv, or .tar shards."
    ),
    output: Path = typer.Option(
        Path("tokenizer.json"), "-o", "--output", help="The tokenizer.json to write."
    ),
    vocab_size: int = typer.Option(
        4096, help="Largest vocabulary (smaller when the captions allow no more merges)."
    ),
) -> None:
    """Train a lower-cased, punctuation-free BPE (EOS pads and is ignored by the loss)."""
    output = expand(output)
    with one_line_errors():
        at_least(3, vocab_size=vocab_size)
        output_file(output)
        tokenizer = train_tokenizer(load_captioned(data).captions(), vocab_size, report=typer.echo)
        tokenizer.save(output)
    typer.echo(f"wrote {output} ({tokenizer.vocab_size} tokens)")
