"""`aimv2 search` speed: exact query latency, incremental index updates, the ANN extra, and the
CLI end to end.

    python bench/search.py                   # ≈ 10 minutes on 2 cores; needs ≈ 3 GB of disk
    python bench/search.py --json out.json   # also write every figure as JSON

1. exact: `exact_top_k` (k = 20) over 100 k and 1 M random unit vectors, 1024-d, float16, saved
   as .npy and memory-mapped as an index opens them; latency per query after two warm-up
   queries (the file in the page cache: "after load"), median of `--queries`.
2. update: a folder of `--files` tiny PNGs indexed with the bundled model, then one file
   changed and the index updated; also at a tenth of the size, to show the update does not
   grow with the folder beyond a stat per file. Files opened by the update are counted.
3. ann: the usearch HNSW graph (the `ann` extra) over `--ann-rows` float16 unit vectors with
   the low intrinsic dimension of real embeddings (a random 64-d latent mapped to 1024-d, plus
   noise; isotropic random vectors are HNSW's worst case and no image embedding looks like
   them): build time, median latency and recall@10 against exact for `--queries` queries
   drawn from the same distribution.
4. cli: `aimv2 search … --index INDEX --json` as a subprocess over the 10 k-file index: wall
   time from start to exit, and the CPU time it used (on a shared machine the wall time
   includes waiting for a core); a text query where the bundled model has a text tower, and a
   query by example always.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import aimv2_mlx  # noqa: E402
from aimv2_mlx.data.sources import Item  # noqa: E402
from aimv2_mlx.index import update_index  # noqa: E402
from aimv2_mlx.search import exact_top_k  # noqa: E402

import host  # noqa: E402

DIM = 1024
SWEEP = (64, 128, 256, 512, 1024)
PARTS = ("exact", "update", "ann", "cli")


def unit_vectors(path: Path, rows: int, seed: int) -> np.ndarray:
    """`rows` random unit float16 vectors written block by block into a memory-mapped .npy."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, DIM))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 65536):
        block = rng.standard_normal((min(65536, rows - start), DIM), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def queries(count: int, seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_exact(vectors: np.ndarray, count: int) -> dict:
    qs = queries(count + 2)
    for q in qs[:2]:
        exact_top_k(vectors, q, 20)
    times = [timed(exact_top_k, vectors, q, 20) for q in qs[2:]]
    return {
        "rows": len(vectors),
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
    }


def write_pngs(folder: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"d{i // 500:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(sub / f"{i:06d}.png")


def bench_update(work: Path, files: int, model) -> dict:
    photos, index = work / f"photos-{files}", work / f"index-{files}"
    write_pngs(photos, files)
    first = timed(update_index, photos, index, model)
    changed = next(photos.rglob("*.png"))
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(changed)
    opened = []
    real = Item.open
    Item.open = lambda item: opened.append(item.path) or real(item)
    try:
        start = time.perf_counter()
        summary = update_index(photos, index, model)
        seconds = time.perf_counter() - start
    finally:
        Item.open = real
    assert summary.embedded == 1 and summary.reused == files - 1, summary
    return {
        "files": files,
        "first_index_s": first,
        "one_changed_update_s": seconds,
        "files_opened": len(opened),
        "summary": summary.to_dict(),
    }


def embedding_like(rows: int, count: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(float16 rows, float32 queries): a 64-d latent through a fixed 1024-d map, plus noise."""
    rng = np.random.default_rng(seed)
    mapping = rng.standard_normal((64, DIM)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        x = rng.standard_normal((n, 64)).astype(np.float32) @ mapping
        x += 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    rows_f16 = np.concatenate(
        [draw(min(65536, rows - s)).astype(np.float16) for s in range(0, rows, 65536)]
    )
    return rows_f16, draw(count)


def bench_ann(rows: int, count: int) -> dict:
    from aimv2_mlx.ann import EXPANSION_ADD, EXPANSION_SEARCH, build_graph, graph_search

    vectors, qs = embedding_like(rows, count)
    start = time.perf_counter()
    graph = build_graph(vectors)
    build = time.perf_counter() - start
    exact = [set(exact_top_k(vectors, q, 10)[0].tolist()) for q in qs]
    sweep = []
    for expansion in SWEEP:  # HNSW's speed/recall knob (ef), on the same graph
        graph.expansion_search = expansion
        recalls, times = [], []
        for q, truth in zip(qs, exact, strict=True):
            start = time.perf_counter()
            rows, _ = graph_search(graph, vectors, q, 10)
            times.append(time.perf_counter() - start)
            recalls.append(len(truth & set(rows.tolist())) / 10)
        sweep.append(
            {
                "expansion_search": expansion,
                "median_ms": 1000 * statistics.median(times),
                "recall_at_10": float(np.mean(recalls)),
            }
        )
    default = next(row for row in sweep if row["expansion_search"] == EXPANSION_SEARCH)
    return {
        "rows": len(vectors),
        "build_s": build,
        "expansion_add": EXPANSION_ADD,
        **default,
        "sweep": sweep,
    }


def bench_cli(index: Path, example: Path, model) -> dict:
    aimv2 = [sys.executable, "-m", "aimv2_mlx.cli"]
    runs = {}
    cases = {"image": ["--image", str(example)]}
    if model.config.is_lit:
        cases["text"] = ["a red circle"]
    for name, query in cases.items():
        times, cpu = [], []
        for _ in range(3):
            used = _children_cpu()
            start = time.perf_counter()
            out = subprocess.run(
                aimv2 + ["search", *query, "--index", str(index), "--json"],
                capture_output=True,
                text=True,
            )
            times.append(time.perf_counter() - start)
            cpu.append(_children_cpu() - used)
            assert out.returncode == 0, out.stderr
        runs[name] = {"median_s": statistics.median(times), "runs_s": times, "cpu_s": cpu}
    if "text" not in runs:
        runs["text"] = "not measured: the bundled model has no text tower"
    return runs


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="Vectors of the larger exact run."
    )
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--ann-rows", type=int, default=100_000)
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="Which measurements (cli needs update)."
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    facts = host.collect_in_subprocess()
    print(f"host: {host.summary(facts)}", flush=True)
    report = {"command": "python bench/search.py " + " ".join(sys.argv[1:]), "host": facts}
    work = Path(tempfile.mkdtemp(prefix="aimv2-bench-search-"))
    try:
        with host.OthersCpu() as others:
            parts = args.parts.split(",")
            if "exact" in parts:
                big = unit_vectors(work / "vectors.npy", args.rows, seed=0)
                report["exact"] = [
                    bench_exact(big[:100_000], args.queries),
                    bench_exact(big, args.queries),
                ]
                print("exact:", report["exact"], flush=True)
            model = aimv2_mlx.load("bundled")
            if "update" in parts:
                report["update"] = [
                    bench_update(work, args.files // 10, model),
                    bench_update(work, args.files, model),
                ]
                print("update:", report["update"], flush=True)
            if "ann" in parts:
                try:
                    report["ann"] = bench_ann(args.ann_rows, args.queries)
                except ImportError as exc:
                    report["ann"] = f"not measured: {exc}"
                print("ann:", report["ann"], flush=True)
            if "cli" in parts:
                example = next((work / f"photos-{args.files}").rglob("*.png"))
                report["cli"] = bench_cli(work / f"index-{args.files}", example, model)
                print("cli:", report["cli"], flush=True)
        report["other_cpus_busy"] = others.cpus
        print(f"other processes kept {others.cpus:.2f} CPUs busy meanwhile", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
