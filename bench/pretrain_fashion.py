"""Fashion-MNIST benchmark: a tiny encoder pre-trained on Fashion-MNIST images with class-name
captions ("a photo of a sneaker") vs image-only vs random init, compared by a linear probe.

    python bench/pretrain_fashion.py --out bench-out/fashion     # ≈ 16 minutes on 2 cores

Data: Debian's `dataset-fashion-mnist`. Pre-training: the first --n-train images of the train
split, 28 px grayscale as RGB, RandomResizedCrop to 56 px (16 patches), tiny preset otherwise.
Probe: mean-pooled features (bidirectional) of the last 6000 train images (5000 train, 1000
validation for C) and of --n-test test-split images; `probe.linear.train_linear`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import aimv2_mlx  # noqa: F401  (OpenBLAS before MLX)
from aimv2_mlx.data.augment import normalize
from aimv2_mlx.probe.linear import train_linear
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.loop import build_pretrain_model, pretrain

import fashion_mnist  # bench/fashion_mnist.py, beside this script
import mlx.core as mx
import numpy as np
from PIL import Image

SIZE = 56


class CaptionedArrays:
    """(image, caption) pairs from uint8 arrays and class names, for `pretrain()`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels, self.origin = images, labels, "fashion-mnist (train split)"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        name = fashion_mnist.CLASSES[self.labels[i]].replace("-", " ")
        return Image.fromarray(self.images[i]).convert("RGB"), f"a photo of a {name}"

    def captions(self) -> list[str]:
        return [self[i][1] for i in range(min(len(self), 2000))]


def features(encoder, images: np.ndarray, batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        pixels = np.stack(
            [
                normalize(
                    Image.fromarray(im)
                    .convert("RGB")
                    .resize((SIZE, SIZE), Image.Resampling.BICUBIC)
                )
                for im in images[i : i + batch]
            ]
        )
        out.append(np.array(encoder.embed(mx.array(pixels))))
    return np.concatenate(out)


def probe(train_x, train_y, test_x, test_y) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    head, _ = train_linear((train_x[:5000], train_y[:5000]), (train_x[5000:], train_y[5000:]), 10)
    return 100.0 * float((head.scores(test_x).argmax(1) == test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=2000)
    args = parser.parse_args()
    if not fashion_mnist.available():
        raise SystemExit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = fashion_mnist.read_split("train")
    test_images, test_labels = fashion_mnist.read_split("t10k")
    source = CaptionedArrays(images[: args.n_train], labels[: args.n_train])
    probe_images, probe_labels = images[-6000:], labels[-6000:]
    test_images, test_labels = test_images[: args.n_test], test_labels[: args.n_test]
    tokenizer = train_tokenizer(source.captions(), 64, 8, min_frequency=1)
    base = dict(
        batch_size=args.batch,
        steps=args.steps,
        warmup_steps=max(1, args.steps // 20),
        checkpoint_every=args.steps,
        log_every=10,
    )

    def config(objective: str) -> PretrainConfig:
        cfg = PretrainConfig.from_preset(
            "tiny", tokenizer.vocab_size, 8, objective=objective, **base
        )
        cfg.encoder.image_size = SIZE
        return cfg

    def score(encoder) -> float:
        return probe(
            features(encoder, probe_images),
            probe_labels,
            features(encoder, test_images),
            test_labels,
        )

    results = {"random init": score(build_pretrain_model(config("multimodal")).encoder)}
    runs = {}
    for objective in ("multimodal", "image"):
        run = args.out / f"run-{objective}"
        shutil.rmtree(run, ignore_errors=True)
        began = time.time()
        record = pretrain(source, run, config(objective), tokenizer)
        runs[objective] = {"final": record, "minutes": (time.time() - began) / 60}
        model = build_pretrain_model(config(objective))
        model.encoder.load_weights(
            str(
                sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
                / "encoder"
                / "model.safetensors"
            )
        )
        results["image + class-name captions" if objective == "multimodal" else "image only"] = (
            score(model.encoder)
        )
        print(results, flush=True)
    table = "| features | linear probe top-1 (%) |\n|---|---|\n" + "\n".join(
        f"| {k} | {v:.1f} |" for k, v in results.items()
    )
    print(table)
    (args.out / "results.json").write_text(
        json.dumps(
            {"results": results, "runs": runs, "args": {k: str(v) for k, v in vars(args).items()}},
            indent=2,
        )
    )
    (args.out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
