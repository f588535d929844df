"""The package's import arrows: the library never reaches into the CLI or the converter, has no
function-local import but the lazy ones listed here, and loads from a plain copy of its folder."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "aimv2_mlx"
FORBIDDEN = ("aimv2_mlx.cli", "aimv2_mlx.convert", "cli", "convert")

# (file under aimv2_mlx/, imported module): why the import waits for its function.
LAZY = {
    ("cpu/blas.py", "mlx.core"): "cpu.blas loads the system OpenBLAS before MLX is first imported",
    ("cpu/blas.py", "numpy"): "cpu.blas loads the system OpenBLAS before NumPy is first imported",
    ("cpu/blas.py", "aimv2_mlx.cpu.settings"): "it imports MLX, which must wait for the BLAS",
    ("model.py", "huggingface_hub"): "its download stack (~0.1 s) waits for a hub id to resolve",
    ("hub.py", "huggingface_hub"): "its upload client (~0.1 s) waits for an upload",
    ("ann.py", "usearch.index"): "usearch is the optional `ann` extra",
    ("search.py", "usearch.index"): "usearch is the optional `ann` extra (float16 brute force)",
    ("probe/metrics.py", "matplotlib"): "the Agg backend is chosen before pyplot is imported",
    ("probe/metrics.py", "matplotlib.pyplot"): "pyplot (~0.4 s) is paid only when a plot is drawn",
    ("train/logs.py", "matplotlib"): "the Agg backend is chosen before pyplot is imported",
    ("train/logs.py", "matplotlib.pyplot"): "pyplot (~0.4 s) is paid only when a plot is drawn",
}


def _absolute(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The absolute names an import statement in `module` (dotted: aimv2_mlx.probe.run) binds."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module]
    package = module.split(".")[: -node.level]
    base = ".".join(package + ([node.module] if node.module else []))
    return [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]


def scan(root: Path) -> tuple[list[str], list[tuple[str, str, int]]]:
    """(imports of the CLI or converter, [(file, module, line)] of function-local imports)."""
    forbidden, local = [], []
    for path in sorted(root.rglob("*.py")):
        # dotted, keeping "__init__", so that a relative import's dots count from the right place
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        relative = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        in_functions = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for sub in ast.walk(node)
        }
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for imported in _absolute(name, node):
                if any(imported == bad or imported.startswith(bad + ".") for bad in FORBIDDEN):
                    forbidden.append(f"{relative}:{node.lineno}: {imported}")
                if id(node) in in_functions:
                    local.append((relative, imported, node.lineno))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                local.append((relative, "TYPE_CHECKING", node.lineno))
    return forbidden, local


def test_no_library_module_imports_the_cli_or_the_converter():
    forbidden, _ = scan(LIBRARY)
    assert forbidden == []


def test_function_local_imports_are_only_the_listed_lazy_ones():
    _, local = scan(LIBRARY)
    unexplained = [
        f"{file}:{line}: {module}" for file, module, line in local if (file, module) not in LAZY
    ]
    assert unexplained == []
    assert set(LAZY) <= {(file, module) for file, module, _ in local}, "a listed import is gone"


def test_the_scan_sees_a_converter_import_a_local_import_and_a_type_checking_block(tmp_path):
    package = tmp_path / "aimv2_mlx"
    (package / "probe").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "probe" / "__init__.py").write_text("from .. import cli\n")
    (package / "model.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .convert.checkpoint import open_checkpoint\n"
        "if TYPE_CHECKING:\n"
        "    from .weights import Recipe\n"
        "def load():\n"
        "    from .train.checkpoint import latest_checkpoint\n"
        "    return lambda: __import__('json')\n"
    )
    forbidden, local = scan(package)
    assert forbidden == [
        "model.py:2: aimv2_mlx.convert.checkpoint",
        "probe/__init__.py:1: aimv2_mlx.cli",
    ]
    assert local == [
        ("model.py", "aimv2_mlx.train.checkpoint", 6),
        ("model.py", "TYPE_CHECKING", 3),
    ]


PLAIN_CHECKOUT = """
import sys
# the editable install's finder and path hook are what made a plain checkout look importable
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path.insert(0, sys.argv[1])
import aimv2_mlx
model = aimv2_mlx.load("bundled")
outside = [name for name in sys.modules if name.startswith(("aimv2_mlx.cli", "aimv2_mlx.convert"))]
print(aimv2_mlx.__file__, model.config.name, type(model).__name__, outside)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")
def test_the_library_loads_the_bundled_model_from_a_plain_copy_of_its_folder(tmp_path):
    shutil.copytree(LIBRARY, tmp_path / "aimv2_mlx", ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    result = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_CHECKOUT, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    file, name, kind, outside = result.stdout.split(maxsplit=3)
    assert Path(file) == tmp_path / "aimv2_mlx" / "__init__.py"
    assert (name, kind, outside.strip()) == ("aimv2-tiny-patch14-56-shapes", "LiT", "[]")
