"""Learning benchmark: pre-train the tiny preset on `aimv2 data shapes`, then linear-probe
held-out images on the shape attributes (colour, shape, position, count).

    python bench/pretrain_shapes.py --out bench-out/shapes          # ≈ 20 minutes on 2 cores
    python bench/pretrain_shapes.py --out /tmp/s --steps 5 --n-train 64 --n-probe 120   # smoke

What it does:
1. `write_shapes`: a pre-training set (seed 0) and a separate probe set (seed 1), same generator.
2. One BPE tokenizer on the pre-training captions; then, for each objective (multimodal, image,
   caption), `pretrain()` with the tiny preset (same seed, data order, steps and schedule) at
   56 px (4 × 4 patches; --image-size), where 2 cores see 4× more images than at 112 px.
3. Features: mean-pooled encoder tokens (bidirectional, as at inference) of the probe set, for
   each pre-trained encoder and for the same architecture at the recipe's random init.
4. Per attribute: the L-BFGS logistic-regression probe (`probe.linear.train_linear`, C swept on
   a validation split, refit on train + val), accuracy on the held-out test split.
Writes results.json, results.md (the table), each run's loss.png and the multimodal run's last
reconstruction grid under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import aimv2_mlx  # noqa: F401  (OpenBLAS before MLX)
from aimv2_mlx.data.augment import normalize
from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import ATTRIBUTES, read_labels, write_shapes
from aimv2_mlx.images import open_image
from aimv2_mlx.model import load
from aimv2_mlx.objective import OBJECTIVES
from aimv2_mlx.probe.linear import train_linear
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.export import export_encoder
from aimv2_mlx.train.loop import build_pretrain_model, pretrain

import mlx.core as mx
import numpy as np


def features(encoder, folder: Path, paths: list[str], batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(paths), batch):
        pixels = np.stack([normalize(open_image(folder / p)) for p in paths[i : i + batch]])
        out.append(np.array(encoder.embed(mx.array(pixels))))
    return np.concatenate(out)


def probe(
    feats: np.ndarray, labels: dict[str, np.ndarray], n_train: int, n_val: int
) -> dict[str, float]:
    """Test accuracy (%) per attribute; features standardised with train statistics."""
    mean, std = feats[:n_train].mean(0), feats[:n_train].std(0) + 1e-6
    x = (feats - mean) / std
    scores = {}
    for attr, y in labels.items():
        classes = len(ATTRIBUTES[attr])
        head, _ = train_linear(
            (x[:n_train], y[:n_train]),
            (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
            classes,
        )
        test = slice(n_train + n_val, None)
        scores[attr] = 100.0 * float((head.scores(x[test]).argmax(1) == y[test]).mean())
    scores["mean"] = float(np.mean([scores[a] for a in labels]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=4000, help="pre-training images")
    parser.add_argument(
        "--n-probe", type=int, default=1500, help="probe images: 60%% train, 13%% val, rest test"
    )
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument(
        "--image-size",
        type=int,
        default=56,
        help="pre-training and probe resolution (the preset's 112 px costs 4x per image)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    data = out / "pretrain-data"
    probe_data = out / "probe-data"
    if not data.exists():
        write_shapes(data, args.n_train, size=args.image_size, seed=0)
    if not probe_data.exists():
        write_shapes(probe_data, args.n_probe, size=args.image_size, seed=1)
    source = load_captioned(data)
    tokenizer = train_tokenizer(source.captions(), 256, 24)
    paths, labels = read_labels(probe_data)
    n_train, n_val = int(0.6 * len(paths)), int(0.13 * len(paths))

    base = dict(
        batch_size=args.batch,
        steps=args.steps,
        warmup_steps=max(1, args.steps // 20),
        peak_lr=args.lr,
        checkpoint_every=args.steps,
        log_every=5,
        sample_every=args.steps,
    )

    def tiny(**values) -> PretrainConfig:
        config = PretrainConfig.from_preset("tiny", tokenizer.vocab_size, 24, **base, **values)
        config.encoder.image_size = args.image_size
        return config

    config = tiny()
    results = {
        "random init": probe(
            features(build_pretrain_model(config).encoder, probe_data, paths),
            labels,
            n_train,
            n_val,
        )
    }
    runs = {}
    for objective in args.objectives.split(","):
        run = out / f"run-{objective}"
        shutil.rmtree(run, ignore_errors=True)
        started = time.time()
        record = pretrain(source, run, tiny(objective=objective), tokenizer)
        minutes = (time.time() - started) / 60
        encoder_dir = out / f"encoder-{objective}"
        shutil.rmtree(encoder_dir, ignore_errors=True)
        export_encoder(run, encoder_dir)
        results[objective] = probe(
            features(load(encoder_dir), probe_data, paths), labels, n_train, n_val
        )
        runs[objective] = {"final": record, "minutes": minutes}
        print(objective, results[objective], f"{minutes:.1f} min", flush=True)
    print("random init", results["random init"], flush=True)

    attrs = list(ATTRIBUTES)
    lines = ["| features | " + " | ".join(attrs) + " | mean |", "|---" * (len(attrs) + 2) + "|"]
    for name, scores in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{scores[a]:.1f}" for a in attrs)
            + f" | {scores['mean']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "probe_split": [n_train, n_val, len(paths) - n_train - n_val],
        "results": results,
        "runs": runs,
        "minutes": (time.time() - began) / 60,
        "config": config.to_dict(),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
