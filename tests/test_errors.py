"""One `Aimv2Error` base: a user's mistake is one line and exit 1 from the CLI, a bug in the
library keeps its traceback, and every domain error class in the tree is an `Aimv2Error`."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.errors import Aimv2Error, SettingError

import pytest

from .conftest import one_line_error, run_cli


def _package_modules():
    """Every module of the installed package: the library, its CLI and its converter (installed
    as `aimv2_mlx.cli` and `aimv2_mlx.convert` from their own folders)."""
    for package in (
        aimv2_mlx,
        importlib.import_module("aimv2_mlx.cli"),
        importlib.import_module("aimv2_mlx.convert"),
    ):
        yield package
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name != "aimv2_mlx.cli.__main__":
                yield importlib.import_module(info.name)


def test_every_error_class_in_the_tree_is_an_aimv2_error():
    errors = {
        f"{cls.__module__}.{name}": cls
        for module in _package_modules()
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception)
        and name.endswith("Error")
        and cls.__module__.startswith("aimv2_mlx")
    }
    assert len(errors) >= 8, sorted(errors)  # ImageError, CheckpointError, ProbeDataError, ...
    outside = sorted(name for name, cls in errors.items() if not issubclass(cls, Aimv2Error))
    assert not outside, outside


def test_domain_errors_keep_the_builtin_base_callers_caught():
    from aimv2_mlx.folders import DiskFullError
    from aimv2_mlx.images import ImageError
    from aimv2_mlx.model import ModelNotFoundError

    assert issubclass(ImageError, ValueError) and issubclass(ModelNotFoundError, FileNotFoundError)
    full = DiskFullError(28, "No space left on device", "out.npy")
    assert isinstance(full, OSError) and isinstance(full, Aimv2Error) and full.filename == "out.npy"


def test_an_unknown_preset_name_is_a_domain_error_naming_the_valid_ones():
    with pytest.raises(SettingError) as refused:
        aimv2_mlx.preset("aimv2-colossal-patch99-224")
    assert "aimv2-colossal-patch99-224" in str(refused.value) and "aimv2-large-patch14-224" in str(
        refused.value
    )
    assert not isinstance(refused.value, KeyError)  # a KeyError's message would print quoted


def test_a_library_bug_inside_a_command_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("heads")  # a bug, not a user's mistake

    monkeypatch.setattr("aimv2_mlx.cli.info.describe_model", broken)
    result = run_cli("info", "bundled")
    assert isinstance(result.exception, KeyError)  # it propagated out of the command
    assert "error: heads" not in result.output


def test_a_library_value_error_in_a_real_process_prints_a_traceback(tmp_path):
    """The console script's process: a plain ValueError from library code is not one line."""
    script = (
        "import aimv2_mlx.cli.info as info\n"
        "def broken(*a, **k):\n"
        "    raise ValueError('heads')\n"
        "info.describe_model = broken\n"
        "from aimv2_mlx.cli.app import main\n"
        "import sys; sys.argv = ['aimv2', 'info', 'bundled']\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert (
        result.returncode != 0
        and "Traceback" in result.stderr
        and "ValueError: heads" in result.stderr
    )


def test_a_users_mistake_inside_a_command_is_one_line_exit_1(monkeypatch):
    def refused(*args, **kwargs):
        raise SettingError("--thing 3: must be at most 2")

    monkeypatch.setattr("aimv2_mlx.cli.info.describe_model", refused)
    one_line_error(run_cli("info", "bundled"), "--thing 3: must be at most 2")


def test_a_system_error_inside_a_command_is_one_line_naming_the_file(monkeypatch, tmp_path):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "model"))

    monkeypatch.setattr("aimv2_mlx.cli.info.describe_model", denied)
    one_line_error(run_cli("info", "bundled"), str(tmp_path / "model"), "permission denied")


def test_resolving_a_hub_id_lets_a_bug_in_the_hub_client_through(monkeypatch, tmp_path):
    import huggingface_hub

    def buggy(*args, **kwargs):
        raise RuntimeError("bug in the download code")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", buggy)
    with pytest.raises(RuntimeError, match="bug in the download code"):
        aimv2_mlx.model.resolve("someone/some-model")


def test_resolving_an_invalid_hub_id_is_a_model_not_found_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(aimv2_mlx.model.ModelNotFoundError, match=r"a/b/c: .*not a valid hub id"):
        aimv2_mlx.model.resolve("a/b/c")


def test_a_labels_file_that_is_not_text_is_one_line_naming_it(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xff\xfe\x00\x81 not text")
    photo = Path(__file__).resolve().parents[1] / "examples" / "photos" / "chelsea.jpg"
    one_line_error(
        run_cli("classify", photo, "--labels-file", labels, "-m", "bundled"),
        str(labels),
        "not a UTF-8 text file",
    )


def test_a_usage_error_raised_inside_a_command_is_one_line_exit_1(capsys):
    from aimv2_mlx.cli.errors import one_line_errors

    import click
    import typer

    with pytest.raises(typer.Exit) as stopped, one_line_errors():
        raise click.BadParameter("--top-k 0: must be at least 1")
    assert stopped.value.exit_code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: ")
        and "--top-k 0: must be at least 1" in lines[0]
    )
