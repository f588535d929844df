"""Rebuild the small encoder bundled with the package for offline demos and tests.

It is made by this project's own pipeline: `bench/pretrain_shapes.py` pre-trains the tiny preset
with the multimodal objective on `aimv2 data shapes` and linear-probes held-out images on the
shape attributes; the encoder is then exported into `aimv2_mlx/assets/` with its data, steps
and probe scores recorded in its config (and so shown by `aimv2 info bundled`).

    python scripts/make_bundled_model.py [--work /tmp/bundled] [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import aimv2_mlx  # noqa: F401  (OpenBLAS before MLX)
from aimv2_mlx.model import BUNDLED_DIR
from aimv2_mlx.train.export import export_encoder

ROOT = Path(__file__).resolve().parents[1]
NAME = "aimv2-tiny-patch14-56-shapes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/aimv2-bundled"))
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    subprocess.run([sys.executable, str(ROOT / "bench" / "pretrain_shapes.py"), "--out", str(args.work),
                    "--objectives", "multimodal", "--steps", str(args.steps)], check=True)
    results = json.loads((args.work / "results.json").read_text())
    scores = results["results"]
    extra = {
        "label": (f"pre-trained by aimv2-mlx on {results['args']['n_train']} generated shapes images "
                  f"(aimv2 data shapes, seed 0), multimodal objective, {args.steps} steps of batch "
                  f"{results['args']['batch']}; a toy for offline demos and tests, not a general-purpose encoder"),
        "random_init": False,
        "data": "aimv2 data shapes (procedural coloured shapes with captions), seed 0",
        "probe_scores": {"what": "linear probe on held-out shapes images "
                                 "(test accuracy %, mean-pooled features)",
                         "pretrained": scores["multimodal"], "random_init": scores["random init"]},
    }
    shutil.rmtree(BUNDLED_DIR, ignore_errors=True)
    export_encoder(args.work / "run-multimodal", BUNDLED_DIR, name=NAME, extra=extra)
    config_file = BUNDLED_DIR / "config.json"
    config = json.loads(config_file.read_text())
    # a path on the machine that trained it: meaningless to users
    del config["source"]["checkpoint"]
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    size = sum(p.stat().st_size for p in BUNDLED_DIR.iterdir())
    print(f"wrote {BUNDLED_DIR} ({size / 1e6:.1f} MB); probe mean {scores['multimodal']['mean']:.1f} "
          f"vs random init {scores['random init']['mean']:.1f}")


if __name__ == "__main__":
    main()
