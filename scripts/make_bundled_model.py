"""Rebuild the small LiT model bundled with the package for offline demos and tests.

It is made by this project's own pipeline: `bench/pretrain_shapes.py` pre-trains the tiny preset
with the multimodal objective on `aimv2 data shapes` and linear-probes held-out images on the
shape attributes; then `bench/lit_shapes.py` LiT-tunes a text tower against that encoder
(locked) on the same captions and scores it zero-shot on held-out images. The LiT model is
exported into `aimv2_mlx/assets/` with the data, steps and scores of both stages recorded in its
config (and so shown by `aimv2 info bundled`).

    python scripts/make_bundled_model.py [--work /tmp/bundled] [--steps 1000] [--lit-steps 1500]
    python scripts/make_bundled_model.py --lit-only   # a new text tower for the bundled encoder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aimv2_mlx  # noqa: F401  (OpenBLAS before MLX)
from aimv2_mlx.lit_tuning import export_lit
from aimv2_mlx.model import BUNDLED_DIR
from aimv2_mlx.train.export import export_encoder
from aimv2_mlx.zeroshot import TEMPLATES_FILE

ROOT = Path(__file__).resolve().parents[1]
NAME = "aimv2-tiny-patch14-56-shapes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/aimv2-bundled"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lit-steps", type=int, default=1500)
    parser.add_argument(
        "--lit-only", action="store_true", help="keep the bundled encoder, LiT-tune again"
    )
    args = parser.parse_args()
    if not args.lit_only:
        pretrain_encoder(args)
    add_text_tower(args)


def pretrain_encoder(args) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "pretrain_shapes.py"),
            "--out",
            str(args.work),
            "--objectives",
            "multimodal",
            "--steps",
            str(args.steps),
        ],
        check=True,
    )
    results = json.loads((args.work / "results.json").read_text())
    scores = results["results"]
    extra = {
        "label": (
            f"pre-trained by aimv2-mlx on {results['args']['n_train']} generated shapes images "
            f"(aimv2 data shapes, seed 0), multimodal objective, {args.steps} steps of batch "
            f"{results['args']['batch']}; a toy for offline demos and tests, not a general-purpose "
            "encoder"
        ),
        "random_init": False,
        "data": "aimv2 data shapes (procedural coloured shapes with captions), seed 0",
        "probe_scores": {
            "what": "linear probe on held-out shapes images "
            "(test accuracy %, mean-pooled features)",
            "pretrained": scores["multimodal"],
            "random_init": scores["random init"],
        },
    }
    shutil.rmtree(BUNDLED_DIR, ignore_errors=True)
    export_encoder(args.work / "run-multimodal", BUNDLED_DIR, name=NAME, extra=extra)
    config_file = BUNDLED_DIR / "config.json"
    config = json.loads(config_file.read_text())
    # a path on the machine that trained it: meaningless to users
    del config["source"]["checkpoint"]
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    size = sum(p.stat().st_size for p in BUNDLED_DIR.iterdir())
    print(
        f"wrote {BUNDLED_DIR} ({size / 1e6:.1f} MB); probe mean {scores['multimodal']['mean']:.1f} "
        f"vs random init {scores['random init']['mean']:.1f}"
    )


def add_text_tower(args) -> None:
    """LiT-tune a text tower against the bundled encoder (a locked copy) and bundle the LiT."""
    encoder = args.work / "encoder"
    shutil.rmtree(encoder, ignore_errors=True)
    shutil.copytree(BUNDLED_DIR, encoder)
    pretrained = json.loads((encoder / "config.json").read_text())["source"]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "lit_shapes.py"),
            "--out",
            str(args.work / "lit"),
            "--encoder",
            str(encoder),
            "--steps",
            str(args.lit_steps),
        ],
        check=True,
    )
    results = json.loads((args.work / "lit" / "results.json").read_text())
    scores = results["results"]
    tmp = BUNDLED_DIR.with_name(BUNDLED_DIR.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    export_lit(args.work / "lit" / "run", tmp, name=NAME)
    # `classify --zero-shot` prompts: of the label-agnostic sets, the best on validation images
    generic = max(
        results["generic_prompts"],
        key=lambda n: sum(scores[a]["by_prompts"][n]["val"] for a in ("color", "shape")),
    )
    templates = results["generic_prompts"][generic]
    (tmp / TEMPLATES_FILE).write_text("".join(t + "\n" for t in templates))
    config = json.loads((tmp / "config.json").read_text())
    lit = config["source"]
    del lit["encoder"]  # a path on the machine that trained it: meaningless to users
    lit.update(
        data=(
            f"aimv2 data shapes captions, seed 0 ({results['args']['n_train']} images, "
            "the encoder's pre-training data)"
        ),
        batch=int(results["args"]["batch"]),
        minutes=round(results["lit_minutes"], 1),
        zero_shot_scores={
            "what": "held-out shapes images (seed 1), primary shape, accuracy %",
            **{a: scores[a] for a in ("color", "shape")},
        },
        retrieval={
            "what": "text→image recall % of each held-out image's caption among "
            f"{scores['text_to_image']['images']} images",
            "lit": scores["text_to_image"]["lit"],
            "random_text_tower": scores["text_to_image"]["random_text_tower"],
        },
    )
    config["source"] = {
        **pretrained,
        "label": pretrained["label"].replace(
            "; a toy",
            f", then a text tower LiT-tuned on its captions ({lit['step']} steps of batch "
            f"{lit['batch']}); a toy",
        ),
        "lit": lit,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(BUNDLED_DIR)
    os.replace(tmp, BUNDLED_DIR)
    size = sum(p.stat().st_size for p in BUNDLED_DIR.iterdir())
    print(
        f"wrote {BUNDLED_DIR} ({size / 1e6:.1f} MB); zero-shot colour "
        f"{scores['color']['zero_shot']:.1f} (probe {scores['color']['linear_probe']:.1f}), "
        f"shape {scores['shape']['zero_shot']:.1f}"
    )


if __name__ == "__main__":
    main()
