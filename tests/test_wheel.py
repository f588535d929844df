"""The wheel installs `cli` and `convert` under `aimv2_mlx`, and its `aimv2` script runs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_builds_without_warnings_and_its_layout_and_console_script_work(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    # a quiet, warning-free build
    assert "warning" not in (build.stdout + build.stderr).lower(), build.stderr
    wheel = next((tmp_path / "dist").glob("aimv2_mlx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))
    }
    assert top_level == {"aimv2_mlx"}
    assert "aimv2_mlx/cli/app.py" in names and "aimv2_mlx/convert/convert.py" in names
    assert any(n.startswith("aimv2_mlx/assets/aimv2-tiny-shapes/") for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    # Dependencies come from the test environment through PYTHONPATH; an editable install there
    # is invisible (its .pth file is not processed from PYTHONPATH), so the wheel's copy is used.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    where = subprocess.run(
        [python, "-c", "import aimv2_mlx.cli, sys; print(aimv2_mlx.cli.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(env_dir) in where
    for name in ("cli", "convert"):
        found = subprocess.run(
            [python, "-c", f"import importlib.util as u; print(u.find_spec('{name}'))"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert found == "None", f"a top-level '{name}' module is importable: {found}"
    result = subprocess.run(
        [env_dir / "bin" / "aimv2", "--help"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "embed" in result.stdout and "convert" in result.stdout and "info" in result.stdout
