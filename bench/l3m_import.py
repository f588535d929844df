"""Reading an AIMv2-L ml-l3m checkpoint: `aimv2 convert` time and peak memory, and the time
`--init-from` takes to load encoder + decoder (530.6M parameters).

The checkpoint is written here in ml-l3m's layout (random weights, float32, no optimizer state
to keep the file at 2.1 GB), as `torch.save({"model": ..., "iteration": ...})` — the
consolidated file `dcp_checkpoint_to_torch` makes. Needs torch (the test extra).

    .venv/bin/python bench/l3m_import.py --out bench/results/l3m_import.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_l3m_file(path: Path) -> int:
    """An AIMv2-L + decoder checkpoint under ml-l3m's names; returns its parameter count."""
    from aimv2_mlx.train.config import PretrainConfig
    from aimv2_mlx.train.loop import build_pretrain_model

    import torch
    from mlx.utils import tree_flatten

    model = build_pretrain_model(PretrainConfig.from_preset("large", 32000, 77), cpu_backend=False)
    renames = {
        "encoder.preprocessor.pos_embed": "preprocessor.blocks.0.pos_embed",
        "decoder.image_projector.weight": "preprocessor.vision_preprocessor.module.weight",
        "decoder.image_projector.bias": "preprocessor.vision_preprocessor.module.bias",
        "decoder.text_pos_embed": "preprocessor.text_preprocessor.positional_embedding",
        "decoder.cls": "preprocessor.text_preprocessor.cls_token",
        "decoder.text_embedding.weight": "preprocessor.text_preprocessor.text_embedding.weight",
        "decoder.text_head.weight": "head.blocks.0.linear.weight",
        "decoder.pixel_head.weight": "head.blocks.1.linear.weight",
    }
    state, count = {}, 0
    for key, value in tree_flatten(model.parameters()):
        tower, rest = key.split(".", 1)
        prefix = "models.image_encoder." if tower == "encoder" else "models.text_decoder."
        array = np.array(value)
        count += array.size
        rest = renames.get(
            key, rest.replace("preprocessor.patchifier", "preprocessor.blocks.0.patchifier")
        )
        if rest.endswith("patchifier.proj.weight"):
            array = array.transpose(0, 3, 1, 2)
        if rest.endswith("attn.qkv.weight"):
            for part, block in zip("qkv", np.split(array, 3), strict=True):
                state[prefix + rest.replace("qkv", f"{part}_proj")] = torch.from_numpy(block.copy())
        else:
            state[prefix + rest] = torch.from_numpy(np.ascontiguousarray(array))
    del model
    torch.save({"model": state, "iteration": 50_000}, path)
    return count


INIT_FROM = """
import sys, time
t = time.perf_counter()
from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.init import L3mStart
from aimv2_mlx.train.loop import build_pretrain_model
from aimv2_mlx.train.optimizer import build_optimizer
start = L3mStart(sys.argv[1])
config = start.config(PretrainConfig.from_preset("large", 32000, 77))
model = build_pretrain_model(config)
optimizer = build_optimizer(config)
optimizer.init(model.trainable_parameters())
print(start.apply(model, optimizer), file=sys.stderr)
print(time.perf_counter() - t)
"""


def measured(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB of that child alone (`wait4`), its stdout).

    A child's peak RSS starts from its parent's size at fork: the parent stays small (the
    checkpoint is written by a child too).
    """
    began = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{command[:4]} failed with exit code {child.returncode}")
    return time.perf_counter() - began, usage.ru_maxrss / 1e6, out  # kB -> GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    # the child's job
    parser.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        print(write_l3m_file(args.write))
        return
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        source = Path(tmp) / "checkpoint_50000.pth"
        parameters = int(measured([sys.executable, __file__, "--write", str(source)])[2])
        convert_s, convert_peak, _ = measured(
            [
                sys.executable,
                "-m",
                "aimv2_mlx.cli",
                "convert",
                str(source),
                str(Path(tmp) / "converted"),
            ]
        )
        _, init_peak, out = measured([sys.executable, "-c", INIT_FROM, str(source)])
        result = {
            "parameters": parameters,
            "file_gb": round(source.stat().st_size / 1e9, 2),
            "convert_s": round(convert_s, 1),
            "convert_peak_rss_gb": round(convert_peak, 2),
            "init_from_s": round(float(out.strip().splitlines()[-1]), 1),
            "init_from_peak_rss_gb": round(init_peak, 2),
        }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
