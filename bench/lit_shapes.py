"""LiT-tuning benchmark: a text tower for the bundled encoder (locked) on `aimv2 data shapes`
captions, scored zero-shot on held-out images against a linear probe on the same features.

    python bench/lit_shapes.py --out bench-out/lit          # ≈ 8 minutes on 2 shared cores
    python bench/lit_shapes.py --out /tmp/l --steps 20 --n-train 300 --n-test 300   # smoke

What it does:
1. `write_shapes`: a LiT training set (seed 0, the data the bundled encoder was pre-trained on)
   and a held-out set (seed 1, never seen by encoder or text tower).
2. `lit_tune()` with the bundled encoder locked: its tokens cached once through the embed
   pipeline, a CLIP BPE learned on the captions, the default text tower for the encoder.
3. On the held-out set: zero-shot colour and shape accuracy of the primary (large) shape with
   three prompt ensembles (`PROMPTS`; the headline is the one best on the validation images);
   the linear probe (`probe.linear.train_linear`, 60 % train, 13 % validation) on the encoder's
   mean-pooled features, scored on the same test images; text→image recall@1/5/10 of each test
   image's own caption among the test images, for the tuned text tower and for the same model
   with the text tower at its initialisation (random).
Writes results.json, results.md, loss.png and the exported LiT model (lit/) under --out; a
second call with the same --out continues (or reuses) its run and evaluates again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.data.shapes import ATTRIBUTES, COLORS, SHAPES, read_labels, write_shapes
from aimv2_mlx.lit import l2_normalize
from aimv2_mlx.lit_tuning import LitConfig, export_lit, lit_tune
from aimv2_mlx.lit_tuning.towers import build_lit, locked_weights
from aimv2_mlx.model import load
from aimv2_mlx.probe.linear import train_linear
from aimv2_mlx.tokenizer import CaptionTokenizer, text_tokenizer
from aimv2_mlx.train import logs
from aimv2_mlx.zeroshot import DEFAULT_TEMPLATES, ZeroShotClassifier

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

RELATIONS = ("above", "below", "left of", "right of")
# Prompt ensembles per attribute: CLIP's (zeroshot.DEFAULT_TEMPLATES), two plain ones, and the
# caption grammar of `aimv2 data shapes` with the other attributes enumerated (CLIP's prompt
# ensembling, arXiv 2103.00020, Section 3.1.4). The set used for the headline is the one with the
# best accuracy on the validation images (the probe's training split), never the test split.
PROMPTS = {
    "color": {
        "clip": list(DEFAULT_TEMPLATES),
        "plain": ["a large {}", "a {}"],
        "captions": [
            f"a large {{}} {s} {r} a {z} {o}"
            for s in SHAPES
            for o in SHAPES
            for r in RELATIONS
            for z in ("small", "medium")
        ],
    },
    "shape": {
        "clip": list(DEFAULT_TEMPLATES),
        "plain": ["a large {}", "a {}"],
        "captions": [
            f"a large {c} {{}} {r} a small {d} {o}"
            for c in COLORS
            for d in COLORS
            for o in SHAPES
            for r in RELATIONS[:2]
        ],
    },
}


def linear_probe(
    features: np.ndarray, labels: np.ndarray, classes: int, n_train: int, n_val: int
) -> float:
    mean, std = features[:n_train].mean(0), features[:n_train].std(0) + 1e-6
    x = (features - mean) / std
    head, _ = train_linear(
        (x[:n_train], labels[:n_train]),
        (x[n_train : n_train + n_val], labels[n_train : n_train + n_val]),
        classes,
    )
    test = slice(n_train + n_val, None)
    return 100.0 * float((head.scores(x[test]).argmax(1) == labels[test]).mean())


def recall_at(
    model, tokenizer: CaptionTokenizer, pixels: np.ndarray, captions: list[str], ks=(1, 5, 10)
) -> dict:
    """Text→image recall@k: how often an image is among the k best for its own caption."""
    image = np.concatenate(
        [
            np.array(l2_normalize(model.encode_image(mx.array(pixels[i : i + 256]))))
            for i in range(0, len(pixels), 256)
        ]
    )
    ids = tokenizer.encode(captions, model.config.text.max_position_embeddings)
    text = np.concatenate(
        [
            np.array(l2_normalize(model.encode_text(mx.array(ids[i : i + 256]))))
            for i in range(0, len(ids), 256)
        ]
    )
    scores = text @ image.T
    rank = (scores > scores[np.arange(len(scores)), np.arange(len(scores))][:, None]).sum(1)
    return {f"recall@{k}": 100.0 * float((rank < k).mean()) for k in ks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--encoder", default="bundled")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=4000, help="LiT training images (seed 0)")
    parser.add_argument(
        "--n-test",
        type=int,
        default=1500,
        help="held-out images (seed 1): 60%% probe train, 13%% probe validation, the rest test",
    )
    parser.add_argument("--context-length", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    train, test = out / "train-data", out / "test-data"
    if not train.exists():
        write_shapes(train, args.n_train, size=56, seed=0)
    if not test.exists():
        write_shapes(test, args.n_test, size=56, seed=1)
    encoder = load(args.encoder)
    config = LitConfig.for_encoder(
        args.encoder,
        encoder.config.vision,
        context_length=args.context_length,
        vocab_size=args.vocab_size,
        batch_size=args.batch,
        steps=args.steps,
        peak_lr=args.lr,
        checkpoint_every=args.steps,
        log_every=10,
    )
    run = out / "run"
    started = time.time()
    if (run / "config.json").is_file():  # an earlier call's run: continue it (or find it done)
        lit_tune(train, run, resume=True, changes={"steps": args.steps})
    else:
        lit_tune(train, run, config)
    minutes = (time.time() - started) / 60
    # nothing left to train: the first call's time
    if minutes < 1 and (out / "results.json").is_file():
        minutes = json.loads((out / "results.json").read_text())["lit_minutes"]
    record = logs.read(run / "log.jsonl")[-1]
    shutil.rmtree(out / "lit", ignore_errors=True)
    model = load(export_lit(run, out / "lit"))
    shutil.copyfile(run / "loss.png", out / "loss.png")

    paths, labels = read_labels(test)
    images = [test / p for p in paths]
    n_train, n_val = int(0.6 * len(paths)), int(0.13 * len(paths))
    held = slice(n_train + n_val, None)
    pixels = np.array(aimv2_mlx.preprocess(images, model))
    mean_pooled = np.concatenate(
        [np.array(model.embed(mx.array(pixels[i : i + 256]))) for i in range(0, len(pixels), 256)]
    )
    results = {}
    val, n_eval = slice(0, n_train), len(paths) - held.start
    for attr in ("color", "shape"):
        classes = list(ATTRIBUTES[attr])
        accuracy = {}
        for name, templates in PROMPTS[attr].items():
            probabilities = ZeroShotClassifier(model, classes, templates)(mx.array(pixels), 256)
            correct = probabilities.argmax(1) == labels[attr]
            accuracy[name] = {
                "val": 100.0 * float(correct[val].mean()),
                "test": 100.0 * float(correct[held].mean()),
            }
        chosen = max(accuracy, key=lambda name: accuracy[name]["val"])
        results[attr] = {
            "zero_shot": accuracy[chosen]["test"],
            "prompts": chosen,
            "by_prompts": accuracy,
            "linear_probe": linear_probe(mean_pooled, labels[attr], len(classes), n_train, n_val),
            "chance": 100.0 / len(classes),
            "test_images": n_eval,
        }
    captions = [
        line.strip() for line in ((test / p).with_suffix(".txt").read_text() for p in paths)
    ]
    tokenizer = text_tokenizer(out / "lit")
    tuned = recall_at(model, tokenizer, pixels[held], captions[held.start :])
    random = build_lit(config_of(run), locked_weights(encoder), encoder.config.preprocess)
    baseline = recall_at(random, tokenizer, pixels[held], captions[held.start :])
    results["text_to_image"] = {
        "lit": tuned,
        "random_text_tower": baseline,
        "images": len(paths) - held.start,
    }
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "generic_prompts": {name: PROMPTS["color"][name] for name in ("clip", "plain")},
        "final": record,
        "lit_minutes": minutes,
        "minutes": (time.time() - began) / 60,
        "trained_parameters": sum(v.size for _, v in tree_flatten(random.trainable_parameters())),
    }
    lines = [
        "| attribute | zero-shot (prompts) | clip / plain / captions prompts | linear probe "
        "(mean-pooled) | chance |",
        "|---|---|---|---|---|",
    ]
    for attr in ("color", "shape"):
        r = results[attr]
        each = " / ".join(f"{v['test']:.1f}" for v in r["by_prompts"].values())
        lines.append(
            f"| {attr} | {r['zero_shot']:.1f} ({r['prompts']}) | {each} | "
            f"{r['linear_probe']:.1f} | {r['chance']:.1f} |"
        )
    lines += [
        "",
        "| text tower | " + " | ".join(tuned) + " |",
        "|---" * (len(tuned) + 1) + "|",
        "| LiT-tuned | " + " | ".join(f"{v:.1f}" for v in tuned.values()) + " |",
        "| random (init) | " + " | ".join(f"{v:.1f}" for v in baseline.values()) + " |",
    ]
    table = "\n".join(lines)
    print(table, f"\nLiT run {minutes:.1f} min, all {summary['minutes']:.1f} min", flush=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")


def config_of(run: Path) -> LitConfig:
    return LitConfig.from_dict(json.loads((run / "config.json").read_text()))


if __name__ == "__main__":
    main()
