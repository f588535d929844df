"""Peak memory of `aimv2 convert` on a sharded ~2 GB checkpoint, against its largest shard.

Writes an AIMv2-H-shaped checkpoint (1536 wide, 18 blocks, float32, random values; 2.04 GB) in
the transformers layout as safetensors shards of at most `--shard-mb` MB with an index, then
runs `aimv2 convert` on it in a child process and reads that process's peak resident set size
from the kernel (`wait4` → `ru_maxrss`). For scale it also measures a child that only imports
the CLI. Claim checked: peak RSS < 1.5 × the largest input shard. The checkpoint is written by a
child process too: a child's peak RSS starts from its parent's size at fork, so the measuring
parent must stay small.

    python bench/convert_memory.py [--shard-mb 500] [--blocks 18] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WIDTH, HIDDEN, HEADS, PATCH, GRID = 1536, 4096, 12, 14, 16


def transformers_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "embeddings.patch_embed.weight": (WIDTH, 3, PATCH, PATCH),
        "embeddings.patch_embed.bias": (WIDTH,),
        "embeddings.rms_norm.weight": (WIDTH,),
        "embeddings.position_embedding.weight": (GRID * GRID, WIDTH),
        "rms_norm.weight": (WIDTH,),
    }
    for i in range(blocks):
        block = f"encoder.layers.{i}."
        shapes.update(
            {
                block + "rms_norm1.weight": (WIDTH,),
                block + "rms_norm2.weight": (WIDTH,),
                **{block + f"attention.{p}_proj.weight": (WIDTH, WIDTH) for p in "qkv"},
                block + "attention.out_proj.weight": (WIDTH, WIDTH),
                block + "ffn.gate_proj.weight": (HIDDEN, WIDTH),
                block + "ffn.up_proj.weight": (HIDDEN, WIDTH),
                block + "ffn.down_proj.weight": (WIDTH, HIDDEN),
            }
        )
    return shapes


def write_checkpoint(folder: Path, blocks: int, shard_bytes: int) -> list[Path]:
    """Shards written one at a time (this process never holds more than one)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shapes = transformers_shapes(blocks)
    groups, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map, paths = {}, []
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (rng.standard_normal(shapes[k], dtype=np.float32) * 0.02) for k in keys}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        weight_map.update({k: name for k in keys})
        paths.append(folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "model_type": "aimv2_vision_model",
        "hidden_size": WIDTH,
        "intermediate_size": HIDDEN,
        "num_hidden_layers": blocks,
        "num_attention_heads": HEADS,
        "image_size": GRID * PATCH,
        "patch_size": PATCH,
        "use_head": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return paths


def spot_check(source: Path, output: Path) -> None:
    """The last block's fused qkv is q, k, v stacked, and the patch projection went
    channels-last.
    """
    from safetensors import safe_open

    def tensor(folder: Path, key: str) -> np.ndarray:
        index = folder / "model.safetensors.index.json"
        shard = (
            json.loads(index.read_text())["weight_map"][key]
            if index.exists()
            else "model.safetensors"
        )
        with safe_open(str(folder / shard), framework="numpy") as handle:
            return handle.get_tensor(key)

    block = json.loads((source / "config.json").read_text())["num_hidden_layers"] - 1
    qkv = tensor(output, f"trunk.blocks.{block}.attn.qkv.weight")
    parts = [tensor(source, f"encoder.layers.{block}.attention.{p}_proj.weight") for p in "qkv"]
    assert np.array_equal(qkv, np.concatenate(parts)), "qkv is not q, k, v stacked"
    conv = tensor(output, "preprocessor.patchifier.proj.weight")
    assert np.array_equal(
        conv, tensor(source, "embeddings.patch_embed.weight").transpose(0, 2, 3, 1)
    )


def peak_rss_of(command: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of a child process, from the kernel's accounting."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out}\n{err}")
    return usage.ru_maxrss * 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=18)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.write_only:
        write_checkpoint(args.write_only, args.blocks, args.shard_mb * 10**6)
        return

    work = Path(tempfile.mkdtemp(prefix="aimv2-convert-bench-"))
    try:
        source = work / "source"
        source.mkdir()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--write-only",
                str(source),
                "--blocks",
                str(args.blocks),
                "--shard-mb",
                str(args.shard_mb),
            ],
            check=True,
        )
        shards = sorted(source.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        python = sys.executable
        own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        baseline, _ = peak_rss_of([python, "-c", "import aimv2_mlx.cli.app"])
        runs = {}
        for label, extra in (("float32", []), ("4-bit", ["-q", "4"])):
            out = work / f"out-{label}"
            peak, seconds = peak_rss_of(
                [python, "-m", "aimv2_mlx.cli", "convert", str(source), str(out), *extra]
            )
            written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            runs[label] = {
                "peak_rss_bytes": peak,
                "ratio_to_largest_shard": peak / largest,
                "seconds": seconds,
                "output_bytes": written,
            }
        spot_check(source, work / "out-float32")  # after the measurements: this parent may grow now
        result = {
            "checkpoint": f"AIMv2-H shape, {args.blocks} blocks, float32, transformers layout",
            "input_bytes": total,
            "shards": len(shards),
            "largest_shard_bytes": largest,
            "import_only_peak_rss_bytes": baseline,
            "measuring_parent_peak_rss_bytes": own_peak,
            "runs": runs,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = 1e6
    print(
        f"input {total / mb:,.0f} MB in {len(shards)} shards (largest {largest / mb:,.0f} MB); "
        f"peak RSS of a child that only imports the CLI: {baseline / mb:,.0f} MB"
    )
    for label, run in runs.items():
        print(
            f"{label}: output {run['output_bytes'] / mb:,.0f} MB in {run['seconds']:.1f} s, peak "
            "RSS "
            f"{run['peak_rss_bytes'] / mb:,.0f} MB = {run['ratio_to_largest_shard']:.2f} x the "
            "largest shard "
            "(claim: < 1.5)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
