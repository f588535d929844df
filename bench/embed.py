"""`aimv2 embed` end to end vs the encoder alone (pre-decoded) vs a PyTorch DataLoader loop.

    python bench/embed.py                  # 256 JPEGs, ~16 min on 2 Zen 5 cores, ~36 on Zen 1
    python bench/embed.py --json out.json  # also write every figure as JSON

All in one invocation, each measurement in its own process:

1. prepare: AIMv2-L with random weights (transformers `Aimv2VisionModel(use_head=False)`,
   `torch.manual_seed(0)`, `save_pretrained`), read by both sides; `--images` JPEGs of
   real-photo content at camera sizes (scikit-image's photos upscaled to 1920x1080, 2048x1536,
   3000x2000 and 4032x3024, with sensor-like noise so they compress like photos, quality 90).
2. encoder: our MLX encoder on pre-decoded, preprocessed tensors (`--warmup` untimed batches,
   then `--encoder-batches` timed batches): the ceiling for the pipeline. Run before and after
   the two end-to-end runs. The ratio is given against the faster of the two (the conservative
   reference, `embed_over_encoder`) and against their mean (`embed_over_encoder_mean`), so
   drift of the machine's speed during the run shows as the gap between them.
3. embed: `aimv2 embed FOLDER -o OUT -m MODEL --json` as a subprocess; img/s is the images
   over `embed_folder`'s own clock (file discovery, decoding, the first compiled batch and
   writing included; model loading excluded).
4. torch: transformers' model in a loop over a torch DataLoader (2 workers, batch as ours)
   whose dataset decodes and preprocesses with the same `aimv2_mlx.images` functions;
   torch.set_num_threads(2), inference_mode, mean pooling; timed from the first batch request
   to the last output, model loading excluded.

Both end-to-end runs write their vectors; the benchmark reports their max difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import host
from encoder import PRESET  # the model both throughput benches measure

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(1920, 1080), (2048, 1536), (3000, 2000), (4032, 3024)]


def mode_prepare(args) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data
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
    Aimv2VisionModel(config).eval().save_pretrained(Path(args.dir) / "model")
    photos = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.immunohistochemistry(),
    ]
    rng = np.random.default_rng(0)
    folder = Path(args.dir) / "images"
    total = 0
    for i in range(args.images):
        w, h = SIZES[i % len(SIZES)]
        if i % 2:
            w, h = h, w  # portrait half the time
        image = Image.fromarray(photos[i % len(photos)]).resize((w, h), Image.Resampling.BICUBIC)
        noisy = np.asarray(image, np.int16) + rng.integers(-6, 7, size=(h, w, 3), dtype=np.int16)
        path = folder / f"{i // 100:02d}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    host.emit({"images": args.images, "megabytes": total / 1e6})


def mode_encoder(args) -> None:
    sys.path.insert(0, str(ROOT))
    import aimv2_mlx

    import mlx.core as mx

    model = aimv2_mlx.load(Path(args.dir) / "model")
    files = sorted((Path(args.dir) / "images").rglob("*.jpg"))[: args.batch]
    pixels = aimv2_mlx.preprocess(files, model)  # decoded once, outside the clock
    mx.eval(pixels)
    for _ in range(args.warmup):
        mx.eval(model.embed(pixels))
    start = time.perf_counter()
    for _ in range(args.encoder_batches):
        mx.eval(model.embed(pixels))
    seconds = time.perf_counter() - start
    host.emit(
        {
            "img_per_s": args.batch * args.encoder_batches / seconds,
            "seconds": seconds,
            "images": args.batch * args.encoder_batches,
        }
    )


def mode_embed(args) -> None:
    out = Path(args.dir) / "out-mlx"
    cmd = [
        sys.executable,
        "-m",
        "aimv2_mlx.cli",
        "embed",
        str(Path(args.dir) / "images"),
        "-o",
        str(out),
        "-m",
        str(Path(args.dir) / "model"),
        "--batch-size",
        str(args.batch),
        "--json",
        "--overwrite",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    summary = json.loads(proc.stdout)
    host.emit(
        {
            "img_per_s": summary["images_per_s"],
            "seconds": summary["seconds"],
            "images": summary["processed"],
            "command": " ".join(cmd[1:]),
        }
    )


def mode_torch(args) -> None:
    import numpy as np
    import torch
    from transformers import Aimv2VisionModel

    sys.path.insert(0, str(ROOT))
    from aimv2_mlx.config import PreprocessConfig
    from aimv2_mlx.images import open_image, to_pixels

    class Photos(torch.utils.data.Dataset):
        def __init__(self, files):
            self.files, self.config = files, PreprocessConfig.for_mode("clip", 224)

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            pixels = to_pixels(open_image(self.files[i]), self.config)
            return torch.from_numpy(pixels).permute(2, 0, 1)

    torch.set_num_threads(args.threads)
    model = Aimv2VisionModel.from_pretrained(Path(args.dir) / "model").eval()
    files = sorted(
        (Path(args.dir) / "images").rglob("*.jpg"),
        key=lambda p: p.relative_to(Path(args.dir) / "images").as_posix(),
    )
    loader = torch.utils.data.DataLoader(
        Photos(files), batch_size=args.batch, num_workers=args.loader_workers
    )
    outputs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for pixels in loader:
            outputs.append(model(pixel_values=pixels).last_hidden_state.mean(dim=1).numpy())
    seconds = time.perf_counter() - start
    np.save(Path(args.dir) / "torch.npy", np.concatenate(outputs))
    host.emit(
        {
            "img_per_s": len(files) / seconds,
            "seconds": seconds,
            "images": len(files),
            "loader_workers": args.loader_workers,
            "threads": torch.get_num_threads(),
        }
    )


def _child(mode: str, env: dict | None = None, **options) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return host.run_worker(cmd, f"bench mode {mode}", env)


def drive(args) -> dict:
    import numpy as np

    machine = host.collect_in_subprocess()
    print(
        f"machine: {machine.get('cpu')} ({machine.get('cores')} CPUs), versions "
        f"{machine['versions']}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="aimv2-bench-embed-") as folder:
        prep = _child("prepare", dir=folder, images=args.images)
        print(
            f"prepared AIMv2-L and {prep['images']} JPEGs ({prep['megabytes']:.0f} MB)", flush=True
        )
        common = dict(dir=folder, batch=args.batch)
        results = {}
        encoder_opts = dict(warmup=args.warmup, encoder_batches=args.encoder_batches)
        runs = []
        for name, opts, env in (
            ("encoder", encoder_opts, None),
            ("embed", {}, None),
            (
                "torch",
                dict(threads=args.threads, loader_workers=args.loader_workers),
                {"AIMV2_MLX_NO_OPENBLAS": "1"},
            ),
            ("encoder", encoder_opts, None),  # again after: the better of the two is the ceiling
        ):
            r = _child(name, env=env, **common, **opts)
            runs.append({"mode": name, **r})
            if name not in results or r["img_per_s"] > results[name]["img_per_s"]:
                results[name] = r
            print(
                f"{name:8s}: {r['img_per_s']:.3f} img/s ({r['images']} images in "
                f"{r['seconds']:.0f} s; "
                f"others used {r['others_cpu']:.2f} CPU)",
                flush=True,
            )
        import aimv2_mlx

        ours, _ = aimv2_mlx.read_embeddings(Path(folder) / "out-mlx")
        diff = float(np.abs(ours - np.load(Path(folder) / "torch.npy")).max())
    return {
        "command": "python bench/embed.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "model": PRESET + " (random weights, torch.manual_seed(0))",
        "images": prep,
        "results": results,
        "runs": runs,
        "embed_over_encoder": results["embed"]["img_per_s"] / results["encoder"]["img_per_s"],
        "embed_over_encoder_mean": results["embed"]["img_per_s"]
        / float(np.mean([r["img_per_s"] for r in runs if r["mode"] == "encoder"])),
        "embed_over_torch": results["embed"]["img_per_s"] / results["torch"]["img_per_s"],
        "max_abs_diff_vs_torch": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", default="drive", choices=["drive", "prepare", "encoder", "embed", "torch"]
    )
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--encoder-batches", type=int, default=16, help="timed encoder-only batches"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--loader-workers", type=int, default=2, help="torch DataLoader workers")
    parser.add_argument("--json", help="also write the full report as JSON here")
    args = parser.parse_args()
    if args.mode != "drive":
        {
            "prepare": mode_prepare,
            "encoder": mode_encoder,
            "embed": mode_embed,
            "torch": mode_torch,
        }[args.mode](args)
        return
    start = time.perf_counter()
    report = drive(args)
    report["total_s"] = time.perf_counter() - start
    r = report["results"]
    print(
        f"\nembed / encoder-only: {report['embed_over_encoder']:.3f} against the faster run, "
        f"{report['embed_over_encoder_mean']:.3f} against their mean (target >= 0.90); "
        f"embed / PyTorch loop: {report['embed_over_torch']:.3f} (target >= 1.2); "
        f"max |MLX - torch| {report['max_abs_diff_vs_torch']:.1e}; "
        f"encoder {r['encoder']['img_per_s']:.3f}, embed {r['embed']['img_per_s']:.3f}, "
        f"torch {r['torch']['img_per_s']:.3f} img/s; total {report['total_s'] / 60:.1f} min"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
