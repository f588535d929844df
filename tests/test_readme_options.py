"""The README's command lines and option tables agree with the CLI's real options.

The options come from the click command that `aimv2` runs (`aimv2_mlx.cli.app.command()`), so a
renamed, removed or re-defaulted option fails here until the README says the same.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from aimv2_mlx.cli.app import command

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")

# Where the README documents each command: headings (their start) whose sections must name every
# option.
HOME = {
    "info": ("Command line",),
    "embed": ("`aimv2 embed`",),
    "convert": ("`aimv2 convert`",),
    "probe": ("`aimv2 probe`",),
    "classify": ("`aimv2 probe`", "Zero-shot classification"),
    "pretrain": ("Pre-training", "`aimv2 pretrain`", "What each command owns"),
    "export": ("Pre-training", "`aimv2 pretrain`", "Use it in PyTorch"),
    "data shapes": ("Pre-training", "`aimv2 pretrain`"),
    "tokenizer train": ("Pre-training", "`aimv2 pretrain`"),
    "lit": ("LiT-tuning", "`aimv2 lit`"),
    "index": ("Search your photos",),
    "search": ("Search your photos",),
    "dupes": ("Search your photos",),
}


def _sections(text: str) -> dict[str, str]:
    """Heading (without the #s) -> the text up to the next heading, code blocks included."""
    sections, heading = {}, None
    fenced = False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"#{2,4} (.*)", line)
        if match:
            heading = match.group(1)
            sections[heading] = ""
        elif heading is not None:
            sections[heading] += line + "\n"
    return sections


def _command(path: str):
    cmd = command()
    for part in path.split():
        cmd = cmd.commands[part]
    return cmd


def _options(cmd) -> dict[str, object]:
    """Every spelling of every option (`--compile` and `--no-compile` both), to its parameter."""
    return {
        opt: param
        for param in cmd.params
        if param.param_type_name == "option"
        for opt in (*param.opts, *param.secondary_opts)
    } | {"--help": None}


def _code(text: str) -> list[str]:
    """Fenced code lines and inline code spans, without shell comments."""
    pieces, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            pieces.append(line)
        else:
            pieces += re.findall(r"`([^`]+)`", line)
    return [re.split(r"\s#\s", piece)[0] for piece in pieces]


def _command_lines(text: str) -> list[tuple[str, list[str]]]:
    """(command path, option spellings) of each `aimv2 …` line in the README's code."""
    found = []
    for piece in _code(text):
        for match in re.finditer(r"(?<![\w/.-])aimv2 (.+)", piece):
            try:
                tokens = [token.strip("[]") for token in shlex.split(match.group(1))]
            except ValueError:
                tokens = match.group(1).split()
            cmd, path = command(), []
            while tokens and tokens[0] in getattr(cmd, "commands", {}):
                path.append(tokens[0])
                cmd = cmd.commands[tokens.pop(0)]
            flags = [token.split("=")[0] for token in tokens if re.match(r"--?[a-zA-Z]", token)]
            found.append((" ".join(path), flags))
    return found


def _tables(sections: dict[str, str]):
    """(command path, header cells, rows of cells) of each table whose first column is `option`."""
    for heading, body in sections.items():
        named = re.match(r"`aimv2 ([\w ]+)`", heading)
        rows = [line for line in body.splitlines() if line.startswith("|")]
        cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
        if named and cells and cells[0][0] == "option":
            yield named.group(1), cells[0], [row for row in cells[2:]]


def test_every_readme_command_line_uses_only_options_its_command_has():
    lines = _command_lines(README.read_text())
    assert len(lines) > 20 and {"embed", "pretrain", "probe", "classify", "convert"} <= {
        p for p, _ in lines
    }
    for path, flags in lines:
        known = _options(_command(path)) | ({"--version": None} if not path else {})
        unknown = [flag for flag in flags if flag not in known]
        assert not unknown, (
            f"README: `aimv2 {path}` has no option {unknown} (it has {sorted(known)})"
        )


def test_readme_option_tables_name_real_options_and_their_defaults():
    tables = list(_tables(_sections(README.read_text())))
    assert {path for path, _, _ in tables} >= {"embed", "convert", "pretrain"}
    for path, header, rows in tables:
        options = _options(_command(path))
        listed = set()
        for row in rows:
            flags = FLAG.findall(row[0])
            assert flags, (path, row)
            for flag in flags:
                assert flag in options, f"README table of `aimv2 {path}`: no option {flag}"
            listed |= {options[flag] for flag in flags}
            for spellings in re.findall(r"--?[\w-]+(?:/--?[\w-]+)+", row[0]):
                params = {options[flag] for flag in spellings.split("/")}
                assert len(params) == 1, (
                    f"README table of `aimv2 {path}`: {spellings} are different options"
                )
            if "default" in header:
                param = options[flags[0]]
                _check_default(path, flags[0], row[header.index("default")], param.default)
        if "default" in header:  # a table of defaults is the command's whole option list
            missing = [p.opts[-1] for p in set(options.values()) - listed - {None}]
            assert not missing, f"README table of `aimv2 {path}` lacks {sorted(missing)}"


def _check_default(path: str, flag: str, cell: str, default) -> None:
    """A literal default in the README (a number, `on`/`off`, a `word`) must be the option's."""
    text = cell.strip("`")
    if isinstance(default, bool):
        assert text in ("on", "off") and (text == "on") == default, (path, flag, cell, default)
    elif re.fullmatch(r"-?[\d.]+(e-?\d+)?", text):
        assert default is not None and float(text) == float(default), (path, flag, cell, default)
    elif cell.startswith("`"):
        assert str(default) == text, (path, flag, cell, default)


@pytest.mark.parametrize("path", sorted(HOME))
def test_every_option_of_a_command_is_named_where_the_readme_documents_it(path):
    sections = _sections(README.read_text())
    body = "".join(text for heading, text in sections.items() if heading.startswith(HOME[path]))
    named = set(FLAG.findall(body))
    params = {param for param in _options(_command(path)).values() if param is not None}
    missing = sorted(p.opts[-1] for p in params if not named & {*p.opts, *p.secondary_opts})
    assert not missing, f"README sections {HOME[path]} never name `aimv2 {path}` {missing}"
