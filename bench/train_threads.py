"""Where a compiled pre-training step's CPU time goes, thread by thread, sampled by Linux perf.

    python bench/train_threads.py                     # small preset, 10 s of samples (≈ 1 min)
    python bench/train_threads.py --preset tiny --seconds 5 --json out.json

`bench/train_profile.py` times the pieces of a step alone; this watches the whole step as
`aimv2 pretrain` runs it. A child process builds the preset's model with the CPU backend, takes
warm-up steps (compilation) and then trains on one fixed batch while `perf record -e cpu-clock`
samples it (a software clock, so it works in VMs without hardware counters; needs Debian's
linux-perf). Reported per thread (MLX runs one thread per stream; the busiest two are the
trunk's streams, the third is the default stream with everything outside the trunks):

* its share of all samples, and how much of it is OpenBLAS's sgemm (kernel and packing);
* utilisation: samples over what the cores could have given in the window;
* in 50 ms bins, how often both stream threads were busy (more than half the bin), one, or none.

The gap between "both busy" and 100% is time one core waits for the other.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import host

HERE = Path(__file__).resolve().parent
FREQUENCY = 499  # samples per second per CPU
BIN = 0.05  # seconds


def worker(preset: str, ready: Path) -> None:
    """Train the preset on one fixed batch until killed; touch `ready` once warm."""
    from aimv2_mlx.train.batches import BatchPlan
    from aimv2_mlx.train.config import PretrainConfig
    from aimv2_mlx.train.loop import build_pretrain_model
    from aimv2_mlx.train.optimizer import build_optimizer
    from aimv2_mlx.train.step import TrainStep

    from pretrain_throughput import CONTEXT, VOCAB
    from train_profile import BATCHES, _dataset

    config = PretrainConfig.from_preset(
        preset, VOCAB, CONTEXT, batch_size=BATCHES[preset], steps=1000
    )
    with tempfile.TemporaryDirectory(prefix="aimv2-threads-") as tmp:
        source, tokenizer = _dataset(Path(tmp), config.encoder.image_size)
        batch = BatchPlan(source, tokenizer, config).step(0)
    model = build_pretrain_model(config)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    step = TrainStep(model, optimizer, config, tokenizer.ignore_ids)
    for _ in range(2):
        step(batch)
    ready.write_text("warm")
    count, began = 0, time.perf_counter()
    while True:
        step(batch)
        count += 1
        print(f"{(time.perf_counter() - began) / count:.4f}", flush=True)


def samples(data: Path) -> list[tuple[str, float, str]]:
    """(thread id, time, symbol) of every sample."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "tid,time,ip,sym"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            rows.append((parts[0], float(parts[1].rstrip(":")), parts[3] if len(parts) > 3 else ""))
    return rows


def summarise(rows: list, seconds: float, cores: int) -> dict:
    per_thread = collections.Counter(tid for tid, _, _ in rows)
    gemm = collections.Counter(tid for tid, _, sym in rows if sym.startswith("sgemm"))
    threads = [tid for tid, _ in per_thread.most_common()]
    streams = threads[:2]
    bins: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for tid, t, _ in rows:
        bins[int(t / BIN)][tid] += 1
    half = FREQUENCY * BIN / 2
    both = sum(all(c[tid] > half for tid in streams) for c in bins.values())
    one = sum(sum(c[tid] > half for tid in streams) == 1 for c in bins.values())
    total = len(rows)
    return {
        "samples": total,
        "utilisation": total / (seconds * FREQUENCY * cores),
        "gemm_share": sum(gemm.values()) / total,
        "threads": [
            {"share": per_thread[tid] / total, "gemm_share_of_thread": gemm[tid] / per_thread[tid]}
            for tid in threads[:4]
        ],
        "bins": {"both_streams_busy": both, "one_busy": one, "neither": len(bins) - both - one},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", help="also write the report as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.preset, Path(args.ready))
        return
    if shutil.which("perf") is None:
        sys.exit("train_threads: needs Linux perf (apt install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="aimv2-threads-") as tmp:
        ready, data = Path(tmp) / "ready", Path(tmp) / "perf.data"
        child = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--preset", args.preset, "--ready", str(ready)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            while not ready.exists():
                if child.poll() is not None:
                    sys.exit("train_threads: the training child stopped before it was warm")
                time.sleep(0.5)
            subprocess.run(
                ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY), "-s"]
                + ["-p", str(child.pid), "-o", str(data), "--", "sleep", str(args.seconds)],
                check=True,
                stderr=subprocess.DEVNULL,
            )
        finally:
            child.kill()
        step_times = [float(line) for line in child.stdout.read().split()]
        report = summarise(samples(data), args.seconds, len(os.sched_getaffinity(0)))
    report["preset"] = args.preset
    report["seconds_per_step"] = step_times[-1] if step_times else None
    report["host"] = host.collect()
    print(
        f"{args.preset}: {report['seconds_per_step']:.3f} s/step; cores busy "
        f"{report['utilisation']:.0%}; sgemm {report['gemm_share']:.0%} of the samples"
    )
    for i, thread in enumerate(report["threads"]):
        print(
            f"  thread {i}: {thread['share']:.0%} of samples, "
            f"{thread['gemm_share_of_thread']:.0%} of it sgemm"
        )
    b = report["bins"]
    print(
        f"  {BIN * 1000:.0f} ms bins: both stream threads busy {b['both_streams_busy']}, "
        f"one {b['one_busy']}, neither {b['neither']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
