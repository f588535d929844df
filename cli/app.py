"""`aimv2`: the Typer app; each command lives in its own module."""

from __future__ import annotations

import typer

import aimv2_mlx  # noqa: F401  (loads the fast BLAS before anything imports MLX)

from . import classify, convert, data, embed, export, info, pretrain, probe, tokenizer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="AIMv2 vision encoders in MLX: inspect, convert, embed, probe, classify and pre-train.")
app.command("info")(info.info)
app.command("embed")(embed.embed)
app.command("convert")(convert.convert)
app.command("probe")(probe.probe)
app.command("classify")(classify.classify)
app.command("pretrain")(pretrain.pretrain)
app.command("export")(export.export)
app.add_typer(data.app, name="data")
app.add_typer(tokenizer.app, name="tokenizer")


def main() -> None:
    app()
