"""Fashion-MNIST probe accuracies and wall times: linear, kNN and attentive heads on frozen
features.

Writes a class-balanced subset of Fashion-MNIST (Debian's `dataset-fashion-mnist`) as PNG
ImageFolder trees (train from the official training split, test from the official test split),
then runs `aimv2_mlx.probe.probe` end to end: decoding + preprocessing through the embed
pipeline, features, the three heads with their validation sweeps, metrics on the test tree.

    python bench/probe_fashion_mnist.py [--model bundled] [--train 5000] [--test 1000] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.probe import HEADS, AttentiveSettings, ProbeSettings, probe

import fashion_mnist  # bench/fashion_mnist.py, beside this script
import numpy as np


def balanced_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_class = count // 10
    return np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=30, help="attentive head epochs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not fashion_mnist.available():
        raise SystemExit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")

    model = aimv2_mlx.load(args.model)
    work = Path(tempfile.mkdtemp(prefix="aimv2-probe-bench-"))
    try:
        train_x, train_y = fashion_mnist.read_split("train")
        test_x, test_y = fashion_mnist.read_split("t10k")
        keep = balanced_subset(train_y, args.train, 0)
        fashion_mnist.write_image_folder(train_x[keep], train_y[keep], work / "train")
        keep = balanced_subset(test_y, args.test, 1)
        fashion_mnist.write_image_folder(test_x[keep], test_y[keep], work / "test")
        settings = ProbeSettings(
            heads=HEADS,
            val_fraction=0.1,
            cache_dir=work / "cache",
            attentive=AttentiveSettings(epochs=args.epochs),
        )
        started = time.perf_counter()
        report = probe(work / "train", work / "out", model, test=work / "test", settings=settings)
        total = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = model.config
    result = {
        "model": config.name,
        "model_label": config.source.get("label"),
        "train_images": report["counts"]["train"],
        "val_images": report["counts"]["val"],
        "test_images": report["counts"]["test"],
        "feature_seconds": report["feature_seconds"],
        "heads": {
            name: {
                "top1": m["top1"],
                "top5": m.get("top5"),
                "balanced_accuracy": m["balanced_accuracy"],
                "seconds": m["seconds"],
                "chosen": {k: v for k, v in m["chosen"].items() if not isinstance(v, dict)},
            }
            for name, m in report["heads"].items()
        },
        "total_seconds": total,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
    }
    print(
        f"{config.name}: {result['train_images']} train / {result['val_images']} val / "
        f"{result['test_images']} test; "
        f"features {result['feature_seconds']:.1f} s, total {total:.1f} s"
    )
    for name, head in result["heads"].items():
        print(
            f"  {name:>9}: top-1 {head['top1']:.4f}  balanced {head['balanced_accuracy']:.4f}  "
            f"{head['seconds']:.1f} s  {head['chosen']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
