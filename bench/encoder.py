"""AIMv2-L embedding throughput: our MLX encoder vs transformers' PyTorch model, plus the GEMM
roofline.

    python bench/encoder.py                 # the full run (~6 minutes on 2 cores)
    python bench/encoder.py --json out.json # also write every figure as JSON

What it does, all in one invocation, each measurement in its own process:

1. prepare: transformers' Aimv2VisionModel (AIMv2-L config, use_head=False) with
   torch.manual_seed(0) weights, written by `save_pretrained` to a temporary folder; our side
   reads that same folder with `aimv2_mlx.load` (converted in memory), so both frameworks run
   identical weights on identical pixels (random, seeded, saved as .npy).
2. roofline: fp32 GEMM GFLOP/s of a 4096 x 4096 matmul in MLX (with the OpenBLAS that
   aimv2_mlx loads, default threads) and in torch (2 threads); run before and after the
   model runs. The roofline is the best of all of them.
3. fp32 encoder runs alternated MLX, PyTorch, MLX, PyTorch, ... (`--rounds`), each process
   doing `--warmup` untimed and `--iters` timed forwards of a batch; the median per framework
   is reported. PyTorch: torch.set_num_threads(2), inference_mode, its default SDPA attention.
4. MLX bfloat16 and float16 (one timed forward each, default batch 1: these CPU paths are
   ~30x slower and their img/s does not depend on the batch size).

FLOPs per image are counted analytically from the matmuls of the forward (patch projection,
qkv, attention scores, attention x values, output projection, three SwiGLU matmuls).
Achieved GFLOP/s = FLOPs/image x img/s; "% roofline" = achieved / roofline.

The host facts (CPU model, family/model, vector ISA, cores, the BLAS MLX calls and its kernel,
OPENBLAS_* settings) come from bench/host.py, read in a fresh process. The machine should be
otherwise idle: the driver measures how much CPU other processes used during each run (from
/proc/stat, `host.OthersCpu`) and flags runs where they took more than 10% of a core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import host

PRESET = "aimv2-large-patch14-224"
ROOT = Path(__file__).resolve().parent.parent


# --- analytic FLOPs --------------------------------------------------------------------------


def flops_per_image(image_size=224, patch=14, dims=1024, depth=24, hidden=2816, channels=3) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image through the encoder, head excluded."""
    n = (image_size // patch) ** 2
    patch_proj = 2 * n * (patch * patch * channels) * dims
    per_block = (
        2 * n * dims * 3 * dims  # qkv
        + 2 * n * n * dims  # scores, all heads
        + 2 * n * n * dims  # attention x values
        + 2 * n * dims * dims  # output projection
        + 3 * 2 * n * dims * hidden  # fc1, fc3, fc2
    )
    return patch_proj + depth * per_block


# --- child modes -----------------------------------------------------------------------------


def mode_prepare(args) -> None:
    import numpy as np
    import torch
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    sys.path.insert(0, str(ROOT))
    import aimv2_mlx

    vision = aimv2_mlx.preset(PRESET).vision
    config = Aimv2VisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        rms_norm_eps=vision.rms_norm_eps,
        use_head=False,
    )
    torch.manual_seed(0)
    Aimv2VisionModel(config).eval().save_pretrained(args.dir)
    pixels = np.random.default_rng(0).standard_normal(
        (args.batch, vision.image_size, vision.image_size, 3)
    )
    np.save(Path(args.dir) / "pixels.npy", pixels.astype(np.float32))
    host.emit(
        {
            "flops_per_image": flops_per_image(
                vision.image_size,
                vision.patch_size,
                vision.hidden_size,
                vision.num_hidden_layers,
                vision.intermediate_size,
            )
        }
    )


def _best_gflops(run, size, repeats) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def mode_roofline_mlx(args) -> None:
    sys.path.insert(0, str(ROOT))
    import aimv2_mlx
    from aimv2_mlx.cpu import blas as backend

    import mlx.core as mx

    n = args.size
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    single = _best_gflops(lambda: mx.eval(a @ b), n, args.repeats)
    result = {
        "mlx_gemm_gflops": single,
        "blas": backend.library_path() or backend.load_reason(),
        "blas_kernel": backend.kernel_in_use() or "n/a",
        "isa": str(backend.cpu_isa()),
    }
    # For reference: the configuration the encoder uses on CPU (one OpenBLAS thread, one
    # matmul per core on its own stream, run concurrently).
    from aimv2_mlx.cpu import settings

    streams = settings.tune()
    if len(streams) > 1:

        def concurrent():
            outs = []
            for s in streams:
                with mx.stream(s):
                    outs.append(a @ b)
            mx.eval(outs)

        result["mlx_gemm_gflops_streams"] = _best_gflops(concurrent, n, args.repeats) * len(streams)
        result["streams"] = len(streams)
    host.emit(result)
    del aimv2_mlx


def mode_roofline_torch(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    n = args.size
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        gflops = _best_gflops(lambda: torch.mm(a, b), n, args.repeats)
    host.emit({"torch_gemm_gflops": gflops, "torch_threads": torch.get_num_threads()})


def mode_mlx(args) -> None:
    sys.path.insert(0, str(ROOT))
    import aimv2_mlx  # OpenBLAS before MLX

    import mlx.core as mx
    import numpy as np

    model = aimv2_mlx.load(args.dir)
    dtype = getattr(mx, args.dtype)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    pixels = mx.array(np.load(Path(args.dir) / "pixels.npy")[: args.batch]).astype(dtype)
    times = []
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        embedding = model.embed(pixels)
        mx.eval(embedding)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    out = Path(args.dir) / f"embedding-mlx-{args.dtype}.npy"
    np.save(out, np.array(embedding.astype(mx.float32)))
    host.emit({"times": times, "batch": args.batch, "embedding": str(out)})


def mode_torch(args) -> None:
    import numpy as np
    import torch
    from transformers import Aimv2VisionModel

    torch.set_num_threads(args.threads)
    model = Aimv2VisionModel.from_pretrained(args.dir).eval()
    pixels = (
        torch.from_numpy(np.load(Path(args.dir) / "pixels.npy")[: args.batch])
        .permute(0, 3, 1, 2)
        .contiguous()
    )
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            embedding = model(pixel_values=pixels).last_hidden_state.mean(dim=1)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    out = Path(args.dir) / "embedding-torch.npy"
    np.save(out, embedding.numpy())
    host.emit(
        {
            "times": times,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation,
            "embedding": str(out),
        }
    )


# --- driver ----------------------------------------------------------------------------------


def _child(mode: str, **options) -> dict:
    """Run one measurement in a fresh process; returns its result and the others' CPU use."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return host.run_worker(cmd, f"bench mode {mode}")


def _machine() -> dict:
    """The host facts (bench/host.py), read in a fresh process that loaded aimv2_mlx's BLAS."""
    return host.collect_in_subprocess()


def _row(name, dtype, batch, times, flops, roofline, others):
    per_batch = statistics.median(times)
    ips = batch / per_batch
    gflops = flops * ips / 1e9
    return {
        "framework": name,
        "dtype": dtype,
        "batch": batch,
        "runs": len(times),
        "s_per_batch": per_batch,
        "img_per_s": ips,
        "gflops": gflops,
        "roofline_fraction": gflops / roofline,
        "max_others_cpu": max(others) if others else None,
        "times": times,
    }


def drive(args) -> dict:
    machine = _machine()
    print(f"machine: {host.summary(machine)}; versions {machine['versions']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="aimv2-bench-") as folder:
        t0 = time.perf_counter()
        prep = _child("prepare", dir=folder, batch=args.batch)
        flops = prep["flops_per_image"]
        print(
            f"prepared AIMv2-L weights ({flops / 1e9:.1f} GFLOP/image) in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )

        roofs = []

        def roofline():
            mlx_r = _child("roofline-mlx", size=4096, repeats=args.gemm_repeats)
            torch_r = _child(
                "roofline-torch", size=4096, repeats=args.gemm_repeats, threads=args.threads
            )
            roofs.append(
                {**mlx_r, **torch_r, "others_cpu": max(mlx_r["others_cpu"], torch_r["others_cpu"])}
            )
            print(
                f"roofline: MLX {mlx_r['mlx_gemm_gflops']:.0f} GFLOP/s, torch "
                f"{torch_r['torch_gemm_gflops']:.0f} GFLOP/s"
                + (
                    f", MLX {mlx_r['streams']} streams x 1 BLAS thread "
                    f"{mlx_r['mlx_gemm_gflops_streams']:.0f}"
                    if "streams" in mlx_r
                    else ""
                ),
                flush=True,
            )

        roofline()
        runs = {"mlx": [], "torch": []}
        for r in range(args.rounds):
            for name in ("mlx", "torch"):
                opts = dict(dir=folder, batch=args.batch, warmup=args.warmup, iters=args.iters)
                if name == "mlx":
                    result = _child("mlx", dtype="float32", **opts)
                else:
                    result = _child("torch", threads=args.threads, **opts)
                runs[name].append(result)
                print(
                    f"round {r + 1} {name:5s}: "
                    + ", ".join(f"{t:.2f}" for t in result["times"])
                    + f" s/batch (others used {result.get('others_cpu', 0):.2f} CPU)",
                    flush=True,
                )
        roofline()
        roof = max(max(x["mlx_gemm_gflops"], x["torch_gemm_gflops"]) for x in roofs)

        import numpy as np

        diff = float(
            np.abs(
                np.load(runs["mlx"][-1]["embedding"]) - np.load(runs["torch"][-1]["embedding"])
            ).max()
        )

        rows = []
        for name, label in (("mlx", "MLX (aimv2-mlx)"), ("torch", "PyTorch (transformers)")):
            times = [t for run in runs[name] for t in run["times"]]
            rows.append(
                _row(
                    label,
                    "float32",
                    args.batch,
                    times,
                    flops,
                    roof,
                    [run.get("others_cpu", 0.0) for run in runs[name]],
                )
            )
        for dtype in args.half_dtypes:
            result = _child(
                "mlx", dir=folder, dtype=dtype, batch=args.half_batch, warmup=0, iters=1
            )
            print(
                f"MLX {dtype}: {result['times'][0]:.1f} s for batch {args.half_batch}", flush=True
            )
            rows.append(
                _row(
                    "MLX (aimv2-mlx)",
                    dtype,
                    args.half_batch,
                    result["times"],
                    flops,
                    roof,
                    [result.get("others_cpu", 0.0)],
                )
            )

    ratio = rows[0]["img_per_s"] / rows[1]["img_per_s"]
    report = {
        "command": "python bench/encoder.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "model": PRESET + " (random weights, torch.manual_seed(0))",
        "flops_per_image": flops,
        "roofline_gflops": roof,
        "roofline_runs": roofs,
        "rows": rows,
        "mlx_over_torch": ratio,
        "max_abs_diff_embedding_fp32": diff,
        "total_s": None,
    }
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {host.summary(m)}; {m.get('memory_gib')} GiB; "
        + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
        f"Roofline (best fp32 4096² GEMM): {report['roofline_gflops']:.0f} GFLOP/s; "
        f"forward = {report['flops_per_image'] / 1e9:.1f} GFLOP/image",
        "",
        "| framework | dtype | batch | img/s | s/batch (median) | GFLOP/s | % of roofline | timed "
        "runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['framework']} | {r['dtype']} | {r['batch']} | {r['img_per_s']:.3f} | "
            f"{r['s_per_batch']:.2f} "
            f"| {r['gflops']:.0f} | {100 * r['roofline_fraction']:.0f}% | {r['runs']} |"
        )
    lines += [
        "",
        f"MLX / PyTorch (fp32): **{report['mlx_over_torch']:.2f}x**; "
        f"max |embedding difference| {report['max_abs_diff_embedding_fp32']:.1e}",
    ]
    busy = [r for r in report["rows"] if (r.get("max_others_cpu") or 0) > 0.1]
    if busy:
        lines.append(
            "WARNING: other processes used > 10% of a CPU during: "
            + ", ".join(f"{r['framework']} {r['dtype']}" for r in busy)
            + " (figures may be low)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        default="drive",
        choices=["drive", "prepare", "roofline-mlx", "roofline-torch", "mlx", "torch"],
    )
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--rounds", type=int, default=2, help="MLX/PyTorch alternations (default 2)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed forwards per process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--half-batch", type=int, default=1, help="batch of the bf16/fp16 runs")
    parser.add_argument("--half-dtypes", nargs="*", default=["bfloat16", "float16"])
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--gemm-repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the full report as JSON here")
    args = parser.parse_args()
    if args.mode != "drive":
        {
            "prepare": mode_prepare,
            "roofline-mlx": mode_roofline_mlx,
            "roofline-torch": mode_roofline_torch,
            "mlx": mode_mlx,
            "torch": mode_torch,
        }[args.mode](args)
        return
    start = time.perf_counter()
    report = drive(args)
    report["total_s"] = time.perf_counter() - start
    print()
    print(markdown(report))
    print(f"\n(total {report['total_s'] / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
