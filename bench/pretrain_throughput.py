"""Training throughput: images/s of the pre-training step, compiled vs eager, and the fraction of
the fp32 matmul roofline it reaches.

    python bench/pretrain_throughput.py                      # tiny and small presets (≈ 5 minutes)
    python bench/pretrain_throughput.py --presets tiny --json out.json

Each (preset, mode) runs in its own process on synthetic batches (random normalised pixels,
random caption ids, the recipe's random prefix lengths), so data loading is not measured:
`--warmup` untimed steps (compilation happens there), then `--iters` timed optimizer steps;
the median step time is reported. FLOPs are counted analytically from the matmuls of forward
(encoder with patch projection; decoder with projector and both heads) × 3 for forward +
backward. Roofline: the best fp32 4096² matmul GFLOP/s in MLX (+ OpenBLAS), before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONTEXT = 24
VOCAB = 256


def forward_flops(config) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image through encoder + decoder + heads."""
    e, d = config.encoder, config.decoder
    n = e.num_patches
    patch_dims = e.patch_size**2 * e.num_channels

    def trunk(tokens, width, hidden, depth):
        return depth * (
            2 * tokens * width * 3 * width
            + 4 * tokens * tokens * width
            + 2 * tokens * width * width
            + 6 * tokens * width * hidden
        )

    s = n + 1 + d.context_length
    return (
        2 * n * patch_dims * e.hidden_size
        + trunk(n, e.hidden_size, e.intermediate_size, e.num_hidden_layers)
        + 2 * n * e.hidden_size * d.hidden_size
        + trunk(s, d.hidden_size, d.intermediate_size, d.num_hidden_layers)
        + 2 * n * d.hidden_size * patch_dims
        + 2 * (d.context_length + 1) * d.hidden_size * d.vocab_size
    )


def roofline() -> float:
    import aimv2_mlx  # noqa: F401

    import mlx.core as mx

    a, b = mx.random.normal((4096, 4096)), mx.random.normal((4096, 4096))
    mx.eval(a @ b)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = max(best, 2 * 4096**3 / (time.perf_counter() - t) / 1e9)
    return best


def measure(preset: str, compiled: bool, batch: int, warmup: int, iters: int) -> dict:
    import aimv2_mlx  # noqa: F401
    from aimv2_mlx.objective import pixel_count, sample_prefix_lengths
    from aimv2_mlx.train.batches import MicroBatch, StepBatch
    from aimv2_mlx.train.config import PretrainConfig
    from aimv2_mlx.train.loop import build_pretrain_model
    from aimv2_mlx.train.optimizer import build_optimizer
    from aimv2_mlx.train.step import TrainStep

    import numpy as np

    config = PretrainConfig.from_preset(
        preset, VOCAB, CONTEXT, batch_size=batch, compile=compiled, steps=1000
    )
    model = build_pretrain_model(config)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    step = TrainStep(model, optimizer, config, (0,))
    rng = np.random.default_rng(0)
    size, n = config.encoder.image_size, config.encoder.num_patches
    times = []
    for i in range(warmup + iters):
        prefix = sample_prefix_lengths(rng, batch, n)
        micro = MicroBatch(
            rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            rng.integers(1, VOCAB, size=(batch, CONTEXT)).astype(np.int32),
            prefix,
            np.arange(batch),
        )
        batch_data = StepBatch([micro], pixel_count(prefix, n), batch * CONTEXT)
        began = time.perf_counter()
        step(batch_data)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    flops = 3 * forward_flops(config)
    return {
        "preset": preset,
        "mode": "compiled" if compiled else "eager",
        "batch": batch,
        "s_per_step": seconds,
        "img_per_s": batch / seconds,
        "gflop_per_image": flops / 1e9,
        "gflop_per_s": flops * batch / seconds / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batch", type=int, default=0, help="0: 64 for tiny, 8 otherwise")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child.split(":")
        result = (
            roofline()
            if kind == "roofline"
            else measure(rest[0], rest[1] == "1", int(rest[2]), args.warmup, args.iters)
        )
        print(json.dumps(result))
        return

    def child(spec: str):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                spec,
                "--warmup",
                str(args.warmup),
                "--iters",
                str(args.iters),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    peaks = [child("roofline")]
    rows = []
    for preset in args.presets.split(","):
        batch = args.batch or (64 if preset == "tiny" else 8)
        for compiled in (True, False):
            rows.append(child(f"measure:{preset}:{int(compiled)}:{batch}"))
            print(json.dumps(rows[-1]), flush=True)
    peaks.append(child("roofline"))
    peak = max(peaks)
    print(f"roofline {peak:.1f} GFLOP/s")
    print(
        "| preset | mode | batch | s / step | img/s | GFLOP / image (fwd+bwd) | GFLOP/s | % of "
        "roofline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["roofline_fraction"] = r["gflop_per_s"] / peak
        print(
            f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['s_per_step']:.2f} | "
            f"{r['img_per_s']:.1f} | "
            f"{r['gflop_per_image']:.2f} | {r['gflop_per_s']:.1f} | "
            f"{100 * r['roofline_fraction']:.1f}% |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"roofline_gflops": peak, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
