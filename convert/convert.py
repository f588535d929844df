"""Convert a checkpoint folder or hub id into an aimv2-mlx folder, written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from aimv2_mlx.model import load, save

_COPIED = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
           "merges.txt", "special_tokens_map.json")


def convert(source: str | os.PathLike, output: str | os.PathLike, revision: str | None = None) -> Path:
    """Load `source` with the shared key map and write config.json + model.safetensors to `output`.

    The folder is built in a temporary sibling and renamed into place, so a failure leaves
    nothing half-written behind.
    """
    from aimv2_mlx.model import resolve

    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output}: already exists")
    model = load(source, revision=revision)
    folder, _ = resolve(source, revision)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save(model, tmp)
        for name in _COPIED:
            if (folder / name).exists():
                shutil.copy2(folder / name, tmp / name)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
