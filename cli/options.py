"""Option values checked before any work, so a typo costs one line, not a run (or a folder to
clean up).
"""

from __future__ import annotations

import os
from pathlib import Path

from aimv2_mlx.errors import SettingError


def at_least(minimum: float, **flags: float | None) -> None:
    """Refuse the first option below `minimum`; keyword names are flags with `_` for `-` (None:
    not given).
    """
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise SettingError(f"--{name.replace('_', '-')} {value}: must be at least {minimum}")


def above_zero(**flags: float | None) -> None:
    """Refuse the first option that is zero or negative (None: not given)."""
    for name, value in flags.items():
        if value is not None and not value > 0:
            raise SettingError(f"--{name.replace('_', '-')} {value}: must be greater than 0")


def fraction(**flags: float) -> None:
    """Refuse the first option outside the open interval (0, 1)."""
    for name, value in flags.items():
        if not 0 < value < 1:
            raise SettingError(
                f"--{name.replace('_', '-')} {value}: must be a fraction between 0 and 1"
            )


def one_of(flag: str, value, choices: tuple) -> None:
    """Refuse a value outside `choices` (None: not given)."""
    if value is not None and value not in choices:
        raise SettingError(f"{flag} {value}: use one of {', '.join(map(str, choices))}")


def block_list(text: str | None) -> tuple[int, ...] | None:
    """`--blocks -6,-1` as integers; the model's depth is checked where the model is known."""
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SettingError(
            f"--blocks {text!r}: give comma-separated block numbers, e.g. '-6,-1' "
            f"(negative ones count from the last block, which is -1)"
        ) from None


def expand(path: Path | None) -> Path | None:
    """`~` in a path typed inside quotes or after `=`, where the shell leaves it."""
    return path.expanduser() if path is not None else None


def output_folder(path: Path, flag: str = "--output") -> Path:
    """A folder to write into, checked before any work: it may be missing (it is made), never a
    file.
    """
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{flag} {path}: exists and is a file, not a folder; choose a folder"
        )
    _writable(path, flag)
    return path


def new_folder(path: Path, name: str = "OUT") -> Path:
    """A folder the command creates itself, checked before any work: it must not exist yet."""
    if path.exists():
        raise FileExistsError(f"{name} {path}: already exists; choose a new folder")
    _writable(path, name)
    return path


def output_file(path: Path, flag: str = "--output") -> Path:
    """A file to write, checked before any work: not a folder, and in a folder that exists."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a folder; give a file name inside it")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"{flag} {path}: the folder {path.parent} does not exist; create it first"
        )
    _writable(path, flag)
    return path


def _writable(path: Path, flag: str) -> None:
    """The nearest existing folder on the way to `path` must be a folder we may write in."""
    existing = next(part for part in (path, *path.parents) if part.exists())
    if existing != path and not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {existing} is a file, not a folder")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: no permission to write in {folder}")


def existing(*paths: Path) -> None:
    """Refuse the first input path that does not exist, before any model is loaded."""
    for path in paths:
        if not os.path.lexists(path):
            raise SettingError(f"{path}: no such file or folder")


def given_options(ctx) -> set[str]:
    """The parameters of `ctx` the user set (command line or environment), not defaults."""
    # by name: typer's and click's ParameterSource enums differ
    return {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")
    }


def resume_changes(
    values: dict,
    given: set[str],
    out: Path,
    resumable: tuple[str, ...],
    with_resume: tuple[str, ...],
) -> dict:
    """The `resumable` settings a resumed run takes from the command line; any other option
    given (beyond `with_resume`, which say how to run it) is refused."""
    fixed = sorted(given - set(resumable) - set(with_resume))
    if fixed:
        flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
        allowed = ", ".join("--" + name.replace("_", "-") for name in resumable)
        raise SettingError(
            f"{flags}: a resumed run keeps the settings in {out / 'config.json'}; "
            f"with --resume only {allowed} can change"
        )
    return {name: values[name] for name in resumable if name in given}
