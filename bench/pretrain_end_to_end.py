"""`aimv2 pretrain` end to end against the bare compiled training step of the same config.

    python bench/pretrain_end_to_end.py   # small preset, 224 px, batch 8 (≈ 6 min idle)
    python bench/pretrain_end_to_end.py --preset tiny --batch 64 --json out.json

What it does, each part in its own process:

1. `aimv2 data shapes` writes `--images` captioned 224-px PNGs (the preset's size);
2. `aimv2 pretrain` trains on them for `--steps` steps with `--log-every 1`; its log.jsonl
   gives img/s per step, timed from the end of one step to the end of the next (waiting for the
   batch included), so decoding, augmentation and tokenising in the prefetch threads show;
3. the same run's config.json drives a bare `TrainStep` (as bench/train_step.py times it) on
   synthetic batches already in memory: no data pipeline at all.

Reported: the median img/s of both after `--warmup` steps and their ratio (the issue's target is
≥ 0.9), with the host facts of bench/host.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import host
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
AIMV2 = [sys.executable, "-c", "from aimv2_mlx.cli.app import main; main()"]


def bare_step(run: Path, steps: int, warmup: int) -> list[float]:
    """img/s of the run's own config, compiled TrainStep, synthetic batches (no data pipeline)."""
    import aimv2_mlx  # noqa: F401  (the BLAS first)
    from aimv2_mlx.objective import pixel_count, sample_prefix_lengths, text_count
    from aimv2_mlx.train.batches import MicroBatch, StepBatch
    from aimv2_mlx.train.config import PretrainConfig
    from aimv2_mlx.train.loop import build_pretrain_model
    from aimv2_mlx.train.optimizer import build_optimizer
    from aimv2_mlx.train.step import TrainStep

    config = PretrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    model = build_pretrain_model(config)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    step = TrainStep(model, optimizer, config, (0,))
    rng = np.random.default_rng(0)
    b, size, n = config.batch_size, config.encoder.image_size, config.encoder.num_patches
    context, vocab = config.decoder.context_length, config.decoder.vocab_size
    rates = []
    for i in range(warmup + steps):
        pixels = rng.standard_normal((b, size, size, 3), dtype=np.float32)
        ids = rng.integers(1, vocab, size=(b, context)).astype(np.int32)
        prefix = sample_prefix_lengths(rng, b, n)
        batch = StepBatch(
            [MicroBatch(pixels, ids, prefix, np.arange(b))],
            pixel_count(prefix, n),
            text_count(ids, (0,)),
        )
        began = time.perf_counter()
        step(batch)
        if i >= warmup:
            rates.append(b / (time.perf_counter() - began))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps (compilation happens there)"
    )
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        print("RESULT " + json.dumps(bare_step(Path(args.bare_worker), args.steps, args.warmup)))
        return
    facts = host.collect_in_subprocess()
    sizes = {"tiny": 112, "small": 224, "base": 224, "large": 224}
    with tempfile.TemporaryDirectory(prefix="aimv2-e2e-") as tmp:
        data, run = Path(tmp) / "shapes", Path(tmp) / "run"
        subprocess.run(
            AIMV2
            + [
                "data",
                "shapes",
                str(data),
                "--n",
                str(args.images),
                "--size",
                str(sizes[args.preset]),
            ],
            check=True,
            capture_output=True,
        )
        total = args.warmup + args.steps
        with host.OthersCpu() as e2e_others:
            subprocess.run(
                AIMV2
                + [
                    "pretrain",
                    str(data),
                    "-o",
                    str(run),
                    "--preset",
                    args.preset,
                    "-b",
                    str(args.batch),
                    "--steps",
                    str(total),
                    "--warmup-steps",
                    "5",
                    "--log-every",
                    "1",
                    "--checkpoint-every",
                    str(10 * total),
                ],
                check=True,
                capture_output=True,
            )
        log = [
            json.loads(line)
            for line in (run / "log.jsonl").read_text().splitlines()
            if line.strip()
        ]
        end_to_end = [r["img_per_s"] for r in log if r["step"] > args.warmup]
        with host.OthersCpu() as bare_others:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--bare-worker",
                    str(run),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
        bare = json.loads(
            next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]
        )
    report = {
        "host": facts,
        "preset": args.preset,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "aimv2_pretrain_img_per_s": statistics.median(end_to_end),
        "bare_step_img_per_s": statistics.median(bare),
        "others_cpu": {"pretrain": e2e_others.cpus, "bare": bare_others.cpus},
    }
    report["ratio"] = report["aimv2_pretrain_img_per_s"] / report["bare_step_img_per_s"]
    print(f"host: {host.summary(facts)}")
    print(
        f"{args.preset}, batch {args.batch}: aimv2 pretrain "
        f"{report['aimv2_pretrain_img_per_s']:.2f} img/s, "
        f"bare compiled step {report['bare_step_img_per_s']:.2f} img/s, ratio "
        f"{report['ratio']:.2f} "
        f"(others used {e2e_others.cpus:.2f} / {bare_others.cpus:.2f} CPU)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
