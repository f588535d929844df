"""`aimv2`: the Typer app; each command lives in its own module."""

from __future__ import annotations

import aimv2_mlx

import click
import typer

from . import (
    classify,
    convert,
    data,
    dupes,
    embed,
    export,
    index,
    info,
    lit,
    pretrain,
    probe,
    search,
    tokenizer,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "AIMv2 vision encoders in MLX: inspect, convert, embed, search, probe, classify, "
        "pre-train, LiT-tune and export."
    ),
)


def _version(value: bool) -> None:
    """`aimv2 --version`: answered before any command is parsed (an eager option)."""
    if value:
        typer.echo(f"aimv2-mlx {aimv2_mlx.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Print the version and exit."
    ),
) -> None:
    """Options of `aimv2` itself, given before a command."""


app.command("info")(info.info)
app.command("embed")(embed.embed)
app.command("convert")(convert.convert)
app.command("probe")(probe.probe)
app.command("classify")(classify.classify)
app.command("pretrain")(pretrain.pretrain)
app.command("lit")(lit.lit)
app.command("export")(export.export)
app.command("index")(index.index)
app.command("search")(search.search)
app.command("dupes")(dupes.dupes)
app.add_typer(data.app, name="data")
app.add_typer(tokenizer.app, name="tokenizer")


METAVARS = {
    "int": "INTEGER",
    "float": "NUMBER",
    "str": "TEXT",
    "path": "PATH",
    "list[Path]": "PATH...",
}


def command() -> click.Command:
    """The click command behind `app`, whose help says what a value is (PATH, INTEGER) rather than
    Typer's Python annotation (`<list[Path]>`), and shows nothing after a flag (Typer shows
    `<bool>`)."""
    root = typer.main.get_command(app)
    pending = [root]
    while pending:
        group = pending.pop()
        context = click.Context(group)
        # made on first use: make it now, to cover it too
        help_option = group.get_help_option(context)
        for param in [*group.params, *([help_option] if help_option else [])]:
            if getattr(param, "is_flag", False):
                shown = ""
            else:
                typed = param.display_type(context).strip("<>")
                shown = param.metavar or METAVARS.get(typed, typed.upper())
            param.display_type_rich = lambda ctx=None, shown=shown: shown
        pending += getattr(group, "commands", {}).values()
    return root


def main() -> None:
    command()()
