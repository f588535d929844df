"""One AIMv2 pre-training step, compiled MLX (aimv2_mlx.train) against the same model and step
written here in PyTorch, plus the fp32 GEMM roofline measured in the same run.

    python bench/train_step.py                           # tiny, small, base; 2 rounds
    python bench/train_step.py --presets tiny --rounds 1 --steps 2   # a smoke run (≈ 40 s)
    python bench/train_step.py --check                   # only the reference check, full depth
    python bench/train_step.py --plain --json out.json   # MLX without the CPU backend; JSON

Two rounds of the three presets take ≈ 9 min on an idle 2-core host; `--check` ≈ 3 min.

The step: prefix-attention encoder + multimodal causal decoder, 0.4·pixel + 1.0·text loss (sums
over counted patches/tokens divided by their counts), global-norm clip 1.0, AdamW (β 0.9/0.95,
wd 0.1 as p·(1 − lr·wd), eps 1e-8, bias-corrected; no decay on vectors and position tables) —
the recipe of the AIMv2 paper (arXiv 2411.14402, §2 and Table 9) as aimv2_mlx/train/step.py and
optimizer.py implement it. transformers has no AIMv2 decoder, so the PyTorch side is written
below from apple/ml-aim's AIMv2 modules: conv-as-matmul patch projection + RMSNorm + learned
positions; pre-norm blocks of fused-qkv attention (no biases, `F.scaled_dot_product_attention`
with a boolean prefix mask or `is_causal`) and SwiGLU fc2(silu(fc1 x)·fc3 x); eager, 2 threads.

Before timing, each preset is checked once, cheaply (its widths and image size, batch 2, at most
2 encoder blocks): the MLX model's initial weights are copied into the torch model and both take
one step on the same batch; the losses must agree to 1e-4 relative and every weight after the
AdamW step to 1e-4 relative (per tensor, in norm; the update after − before to 1e-2, the
pre-clip gradient norm to 1e-3), else the run stops. `--check` does that at the
full preset depth and times nothing.

Timing: each framework in its own process, alternated MLX, torch, MLX, torch (`--rounds`), each
doing `--warmup` untimed steps (MLX compiles there) and `--steps` timed ones on synthetic batches
(seeded normal pixels, random captions padded with the ignored id 0, the recipe's uniform prefix
lengths), the same batches for both. Reported: median s/step over all timed steps, img/s,
achieved GFLOP/s (analytic matmul FLOPs of the forward × 3 for forward + backward, from
bench/pretrain_throughput.py), % of the roofline (best fp32 4096² matmul in an MLX process,
measured before and after), MLX/torch, and the host facts of bench/host.py; runs during which
other processes used more than 10% of a CPU are flagged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import host
import numpy as np
from pretrain_throughput import CONTEXT, VOCAB

ROOT = Path(__file__).resolve().parent.parent
PAD = 0  # the ignored caption id of the synthetic batches
BATCHES = {"tiny": 64, "small": 8, "base": 8}
TOLERANCE = 1e-4
# the step itself (after − before): Adam's first step ≈ lr·sign(g) flips where g ≈ 0
UPDATE_TOLERANCE = 1e-2
# the pre-clip gradient norm: a sum of squares over every gradient, summed in another order
NORM_TOLERANCE = 1e-3


# --- shared by both frameworks: the synthetic batches ------------------------------------------


def synthetic_batch(step: int, batch: int, image_size: int, num_patches: int):
    """(pixels (B, H, W, 3), ids (B, T), prefix lengths (B,), pixel count, text count) of `step`."""
    rng = np.random.default_rng([0, step])
    pixels = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
    ids = rng.integers(1, VOCAB, size=(batch, CONTEXT)).astype(np.int32)
    lengths = rng.integers(CONTEXT // 2, CONTEXT + 1, size=batch)
    ids[np.arange(CONTEXT)[None, :] >= lengths[:, None]] = PAD
    # uniform on 1..N-1, as the recipe
    prefix = rng.integers(1, num_patches, size=batch).astype(np.int32)
    return pixels, ids, prefix, int(np.sum(num_patches - prefix)), int(np.sum(ids != PAD))


# --- MLX workers -------------------------------------------------------------------------------


def _mlx_config(preset: str, batch: int, depth: int = 0, warmup_steps: int = 100):
    from aimv2_mlx.config import DecoderConfig
    from aimv2_mlx.train.config import PretrainConfig

    config = PretrainConfig.from_preset(
        preset, VOCAB, CONTEXT, batch_size=batch, steps=1000, warmup_steps=warmup_steps
    )
    if depth and depth < config.encoder.num_hidden_layers:
        encoder = dataclasses.replace(config.encoder, num_hidden_layers=depth)
        config = dataclasses.replace(
            config, encoder=encoder, decoder=DecoderConfig.for_encoder(encoder, VOCAB, CONTEXT)
        )
    return config


def _mlx_step(config, plain: bool):
    from aimv2_mlx.train.loop import build_pretrain_model
    from aimv2_mlx.train.optimizer import build_optimizer
    from aimv2_mlx.train.step import TrainStep

    model = build_pretrain_model(config, cpu_backend=not plain)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    return model, optimizer, TrainStep(model, optimizer, config, (PAD,))


def _step_batch(step: int, config):
    from aimv2_mlx.train.batches import MicroBatch, StepBatch

    b, size, n = config.batch_size, config.encoder.image_size, config.encoder.num_patches
    pixels, ids, prefix, pixel_n, text_n = synthetic_batch(step, b, size, n)
    return StepBatch([MicroBatch(pixels, ids, prefix, np.arange(b))], pixel_n, text_n)


def worker_spec(args) -> dict:
    """The model and step as plain numbers, so the torch process needs no MLX."""
    from aimv2_mlx.train.loop import build_pretrain_model
    from aimv2_mlx.train.optimizer import decays, schedule

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from pretrain_throughput import forward_flops

    config = _mlx_config(args.preset, args.batch, args.depth, args.warmup_steps)
    e, d = config.encoder, config.decoder
    parameters = tree_flatten(
        build_pretrain_model(config, cpu_backend=not args.plain).trainable_parameters()
    )
    return {
        "preset": args.preset,
        "batch": args.batch,
        "image_size": e.image_size,
        "patch_size": e.patch_size,
        "channels": e.num_channels,
        "width": e.hidden_size,
        "depth": e.num_hidden_layers,
        "heads": e.num_attention_heads,
        "hidden": e.intermediate_size,
        "eps": e.rms_norm_eps,
        "dec_width": d.hidden_size,
        "dec_depth": d.num_hidden_layers,
        "dec_heads": d.num_attention_heads,
        "dec_hidden": d.intermediate_size,
        "vocab": d.vocab_size,
        "context": d.context_length,
        "pixel_weight": config.pixel_weight,
        "text_weight": config.text_weight,
        "lr": float(schedule(config)(mx.array(0)).item()),
        "betas": list(config.betas),
        "adam_eps": config.eps,
        "weight_decay": config.weight_decay,
        "grad_clip": config.grad_clip,
        "decayed": [path for path, value in parameters if decays(path, value)],
        "gflop_per_image": 3 * forward_flops(config) / 1e9,
    }


def worker_mlx(args) -> dict:
    config = _mlx_config(args.preset, args.batch)
    _, _, step = _mlx_step(config, args.plain)
    times = []
    for i in range(args.warmup + args.steps):
        batch = _step_batch(i, config)
        began = time.perf_counter()
        step(batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - began)
    return {"times": times}


def worker_mlx_check(args) -> dict:
    """One step from the initial weights; writes both weight sets, the batch and the losses."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = _mlx_config(args.preset, args.batch, args.depth, args.warmup_steps)
    model, _, step = _mlx_step(config, args.plain)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    stats = step(_step_batch(0, config))
    mx.eval(model.parameters())
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    np.savez(
        args.out,
        **{f"before/{k}": v for k, v in before.items()},
        **{f"after/{k}": v for k, v in after.items()},
    )
    return {"stats": stats}


def worker_roofline(args) -> dict:
    from pretrain_throughput import roofline

    return {"gflops": roofline()}


# --- the PyTorch reference -------------------------------------------------------------------


def torch_model(spec: dict):
    """The AIMv2 encoder + decoder of `spec` as torch modules, parameter paths as in aimv2_mlx."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dims))

        def forward(self, x):
            return F.rms_norm(x, self.weight.shape, self.weight, spec["eps"])

    class Attention(nn.Module):
        def __init__(self, dims, heads):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dims, 3 * dims, bias=False)
            self.proj = nn.Linear(dims, dims, bias=False)

        def forward(self, x, mask):
            B, N, D = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.proj(out.transpose(1, 2).reshape(B, N, D))

    class SwiGLU(nn.Module):
        def __init__(self, dims, hidden):
            super().__init__()
            self.fc1 = nn.Linear(dims, hidden, bias=False)
            self.fc2 = nn.Linear(hidden, dims, bias=False)
            self.fc3 = nn.Linear(dims, hidden, bias=False)

        def forward(self, x):
            return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))

    class Block(nn.Module):
        def __init__(self, dims, heads, hidden):
            super().__init__()
            self.norm_1, self.attn = RMSNorm(dims), Attention(dims, heads)
            self.norm_2, self.mlp = RMSNorm(dims), SwiGLU(dims, hidden)

        def forward(self, x, mask):
            x = x + self.attn(self.norm_1(x), mask)
            return x + self.mlp(self.norm_2(x))

    class Transformer(nn.Module):
        def __init__(self, dims, depth, heads, hidden):
            super().__init__()
            self.blocks = nn.ModuleList(Block(dims, heads, hidden) for _ in range(depth))
            self.post_trunk_norm = RMSNorm(dims)

        def forward(self, x, mask):
            for block in self.blocks:
                x = block(x, mask)
            return self.post_trunk_norm(x)

    p, c, w = spec["patch_size"], spec["channels"], spec["width"]
    n = (spec["image_size"] // p) ** 2
    patch_dims = p * p * c

    def patchify(pixels):
        B, H, W, C = pixels.shape
        x = pixels.view(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, n, patch_dims)

    class Patchifier(nn.Module):
        def __init__(self):
            super().__init__()
            # the stride-p convolution as one matmul
            self.proj = nn.Linear(patch_dims, w, bias=True)
            self.norm = RMSNorm(w)

        def forward(self, pixels):
            return self.norm(self.proj(patchify(pixels)))

    class Preprocessor(nn.Module):
        def __init__(self):
            super().__init__()
            self.patchifier = Patchifier()
            self.pos_embed = nn.Parameter(torch.zeros(1, n, w))

        def forward(self, pixels):
            return self.patchifier(pixels) + self.pos_embed

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.preprocessor = Preprocessor()
            self.trunk = Transformer(w, spec["depth"], spec["heads"], spec["hidden"])

        def forward(self, pixels, prefix):
            idx = torch.arange(n)
            mask = (idx[None, :] <= idx[:, None])[None] | (
                idx[None, None, :] < prefix.view(-1, 1, 1)
            )
            return self.trunk(self.preprocessor(pixels), mask[:, None])

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            d, t = spec["dec_width"], spec["context"]
            self.image_projector = nn.Linear(w, d, bias=True)
            self.text_embedding = nn.Embedding(spec["vocab"], d)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.text_pos_embed = nn.Parameter(torch.zeros(t + 1, d))
            self.trunk = Transformer(d, spec["dec_depth"], spec["dec_heads"], spec["dec_hidden"])
            self.pixel_head = nn.Linear(d, patch_dims, bias=False)
            self.text_head = nn.Linear(d, spec["vocab"], bias=False)

        def forward(self, tokens, ids):
            B, T = ids.shape
            text = (
                torch.cat([self.cls.expand(B, 1, -1), self.text_embedding(ids)], dim=1)
                + self.text_pos_embed[: T + 1]
            )
            h = self.trunk(torch.cat([self.image_projector(tokens), text], dim=1), None)
            return self.pixel_head(h[:, :n]), self.text_head(h[:, n:])

    class PretrainModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), Decoder()

        def forward(self, pixels, ids, prefix, pixel_n, text_n):
            """(total, pixel loss, text loss): sums over counted targets divided by the counts."""
            predicted, logits = self.decoder(self.encoder(pixels, prefix), ids)
            patches = patchify(pixels)
            mean = patches.mean(dim=-1, keepdim=True)
            targets = (patches - mean) / torch.sqrt(
                patches.var(dim=-1, keepdim=True, correction=1) + 1e-6
            )
            mse = (predicted[:, :-1] - targets[:, 1:]).square().mean(dim=-1)
            counted = torch.arange(1, n)[None, :] >= prefix[:, None]
            l_pixel = (mse * counted).sum() / max(pixel_n, 1)
            ce = F.cross_entropy(
                logits[:, :-1].reshape(-1, spec["vocab"]), ids.reshape(-1).long(), reduction="none"
            )
            l_text = (ce * (ids.reshape(-1) != PAD)).sum() / max(text_n, 1)
            return spec["pixel_weight"] * l_pixel + spec["text_weight"] * l_text, l_pixel, l_text

    return PretrainModel()


def torch_setup(spec: dict, threads: int, weights: dict | None = None):
    """(model, step function); `weights` (aimv2_mlx paths -> arrays) replaces the torch init."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_model(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if weights is not None:
                param.copy_(torch.from_numpy(weights[name].reshape(param.shape)))
            elif name.endswith("bias"):
                param.zero_()
            elif param.ndim >= 2 and not name.endswith("norm.weight"):
                param.normal_(0.0, 0.02)  # the init sets values, not cost
    decayed = set(spec["decayed"])  # our optimizer's own rule, applied in the MLX process
    decay = [p for k, p in model.named_parameters() if k in decayed]
    rest = [p for k, p in model.named_parameters() if k not in decayed]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec["weight_decay"]},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=spec["lr"],
        betas=tuple(spec["betas"]),
        eps=spec["adam_eps"],
    )
    params = list(model.parameters())

    def step(pixels, ids, prefix, pixel_n, text_n) -> dict:
        total, l_pixel, l_text = model(
            torch.from_numpy(pixels),
            torch.from_numpy(ids),
            torch.from_numpy(prefix),
            pixel_n,
            text_n,
        )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
        optimizer.step()
        return {
            "loss": total.item(),
            "loss_pixel": l_pixel.item(),
            "loss_text": l_text.item(),
            "grad_norm": norm.item(),
        }

    return model, step


def worker_torch(args) -> dict:
    spec = json.loads(Path(args.spec).read_text())
    _, step = torch_setup(spec, args.threads)
    n = (spec["image_size"] // spec["patch_size"]) ** 2
    times = []
    for i in range(args.warmup + args.steps):
        batch = synthetic_batch(i, spec["batch"], spec["image_size"], n)
        began = time.perf_counter()
        step(*batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - began)
    import torch

    return {"times": times, "threads": torch.get_num_threads()}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def worker_torch_check(args) -> dict:
    """Our MLX weights into the torch model, one step, and how far every figure is from MLX's."""
    spec = json.loads(Path(args.spec).read_text())
    saved = np.load(args.out)
    before = {k[len("before/") :]: saved[k] for k in saved.files if k.startswith("before/")}
    model, step = torch_setup(spec, args.threads, before)
    names = {k for k, _ in model.named_parameters()}
    if names != set(before):
        raise SystemExit(
            f"parameter names differ: torch only {sorted(names - set(before))}, "
            f"MLX only {sorted(set(before) - names)}"
        )
    n = (spec["image_size"] // spec["patch_size"]) ** 2
    stats = step(*synthetic_batch(0, spec["batch"], spec["image_size"], n))
    weights = {
        k: _relative(p.detach().numpy().reshape(saved[f"after/{k}"].shape), saved[f"after/{k}"])
        for k, p in model.named_parameters()
    }
    update = {
        k: _relative(
            p.detach().numpy().reshape(before[k].shape) - before[k], saved[f"after/{k}"] - before[k]
        )
        for k, p in model.named_parameters()
    }
    worst, worst_update = max(weights, key=weights.get), max(update, key=update.get)
    return {
        "stats": stats,
        "weights_max_relative": weights[worst],
        "worst_weight": worst,
        "update_max_relative": update[worst_update],
        "worst_update": worst_update,
    }


MLX_WORKERS = ("spec", "mlx", "mlx-check", "roofline")
WORKERS = {
    "spec": worker_spec,
    "mlx": worker_mlx,
    "mlx-check": worker_mlx_check,
    "roofline": worker_roofline,
    "torch": worker_torch,
    "torch-check": worker_torch_check,
}


# --- driver ----------------------------------------------------------------------------------


def _run(worker: str, args, **options) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ] + (["--plain"] if args.plain else [])
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return host.run_worker(cmd, f"train_step worker {worker} {options}")


def _spec_file(
    folder: Path, args, preset: str, batch: int, depth: int = 0, warmup_steps: int = 100
) -> tuple:
    spec = _run("spec", args, preset=preset, batch=batch, depth=depth, warmup_steps=warmup_steps)
    path = folder / f"spec-{preset}-{batch}-{depth}-{warmup_steps}.json"
    path.write_text(json.dumps(spec))
    return spec, path


def compare(ours: dict, ref: dict) -> dict:
    """Relative differences of the MLX step's figures (`ours`) and the torch check's (`ref`)."""
    relative = {
        k: abs(ours[k] - ref["stats"][k]) / max(abs(ref["stats"][k]), 1e-30)
        for k in ("loss", "loss_pixel", "loss_text", "grad_norm")
    }
    return {
        "mlx": ours,
        "torch": ref["stats"],
        "relative": relative,
        **{
            k: ref[k]
            for k in ("weights_max_relative", "worst_weight", "update_max_relative", "worst_update")
        },
    }


def failures(figures: dict) -> list[str]:
    """Which figures are past their tolerance (empty: the reference took the same step)."""
    relative = figures["relative"]
    bad = [
        f"{k} {relative[k]:.1e} > {TOLERANCE:g}"
        for k in ("loss", "loss_pixel", "loss_text")
        if relative[k] > TOLERANCE
    ]
    if relative["grad_norm"] > NORM_TOLERANCE:
        bad.append(f"gradient norm {relative['grad_norm']:.1e} > {NORM_TOLERANCE:g}")
    if figures["weights_max_relative"] > TOLERANCE:
        bad.append(
            f"weights {figures['weights_max_relative']:.1e} ({figures['worst_weight']}) > "
            f"{TOLERANCE:g}"
        )
    if figures["update_max_relative"] > UPDATE_TOLERANCE:
        bad.append(
            f"update {figures['update_max_relative']:.1e} ({figures['worst_update']}) > "
            f"{UPDATE_TOLERANCE:g}"
        )
    return bad


def run_check(
    folder: Path, args, preset: str, batch: int, depth: int, spec_path: Path | None = None
) -> dict:
    """Our step and the torch reference from the same initial weights and batch; `compare`'s
    figures.

    warmup_steps 0 makes the first step's learning rate the peak (1e-3), so the AdamW update is
    large enough (a few % of a weight) that a wrong step shows far above the tolerance.
    `spec_path` replaces the model/step description the torch side is built from.
    """
    if spec_path is None:
        _, spec_path = _spec_file(folder, args, preset, batch, depth, 0)
    out = folder / f"check-{preset}.npz"
    ours = _run(
        "mlx-check", args, preset=preset, batch=batch, depth=depth, warmup_steps=0, out=out
    )["stats"]
    ref = _run("torch-check", args, spec=spec_path, out=out)
    out.unlink()
    return {"preset": preset, "batch": batch, "depth": depth or "full", **compare(ours, ref)}


def check(folder: Path, args, preset: str, batch: int, depth: int) -> dict:
    """`run_check`, printed; raises SystemExit when the reference is not the same step."""
    figures = run_check(folder, args, preset, batch, depth)
    r = figures["relative"]
    print(
        f"check {preset}: loss rel {r['loss']:.1e} (pixel {r['loss_pixel']:.1e}, text "
        f"{r['loss_text']:.1e}), "
        f"grad norm rel {r['grad_norm']:.1e}, weights after one step rel "
        f"{figures['weights_max_relative']:.1e} "
        f"({figures['worst_weight']}), update rel {figures['update_max_relative']:.1e} "
        f"({figures['worst_update']})",
        flush=True,
    )
    bad = failures(figures)
    if bad:
        raise SystemExit(
            f"check {preset}: the PyTorch reference is not the same step as ours: " + "; ".join(bad)
        )
    return figures


def drive(args) -> dict:
    facts = host.collect_in_subprocess()
    print(f"host: {host.summary(facts)}", flush=True)
    presets = args.presets.split(",")
    report = {
        "command": "python bench/train_step.py " + " ".join(sys.argv[1:]),
        "host": facts,
        "mlx_backend": "plain MLX layers" if args.plain else "CPU backend",
        "checks": [],
        "rows": [],
        "roofline_runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="aimv2-train-step-") as tmp:
        folder = Path(tmp)
        for preset in presets:
            batch = args.batch or BATCHES.get(preset, 8)
            report["checks"].append(
                check(
                    folder,
                    args,
                    preset,
                    args.check_batch if not args.check else batch,
                    0 if args.check else args.check_depth,
                )
            )
        if args.check:
            return report
        report["roofline_runs"].append(_run("roofline", args)["gflops"])
        print(f"roofline {report['roofline_runs'][-1]:.0f} GFLOP/s", flush=True)
        for preset in presets:
            batch = args.batch or BATCHES.get(preset, 8)
            spec, spec_path = _spec_file(folder, args, preset, batch)
            times, others = {"mlx": [], "torch": []}, {"mlx": [], "torch": []}
            for r in range(args.rounds):
                for name in ("mlx", "torch"):
                    options = (
                        {"preset": preset, "batch": batch} if name == "mlx" else {"spec": spec_path}
                    )
                    run = _run(name, args, **options)
                    times[name].append(run["times"])
                    others[name].append(run["others_cpu"] or 0.0)
                    print(
                        f"{preset} round {r + 1} {name:5s}: "
                        + ", ".join(f"{t:.3f}" for t in run["times"])
                        + f" s/step (others used {others[name][-1]:.2f} CPU)",
                        flush=True,
                    )
            for name in ("mlx", "torch"):
                seconds = statistics.median([t for run in times[name] for t in run])
                report["rows"].append(
                    {
                        "preset": preset,
                        "framework": name,
                        "batch": batch,
                        "s_per_step": seconds,
                        "img_per_s": batch / seconds,
                        "gflop_per_image": spec["gflop_per_image"],
                        "gflop_per_s": spec["gflop_per_image"] * batch / seconds,
                        "round_medians": [statistics.median(run) for run in times[name]],
                        "max_others_cpu": max(others[name]),
                        "times": times[name],
                    }
                )
        report["roofline_runs"].append(_run("roofline", args)["gflops"])
    roof = report["roofline_gflops"] = max(report["roofline_runs"])
    for row in report["rows"]:
        row["roofline_fraction"] = row["gflop_per_s"] / roof
    report["mlx_over_torch"] = {
        preset: next(
            r["img_per_s"]
            for r in report["rows"]
            if r["preset"] == preset and r["framework"] == "mlx"
        )
        / next(
            r["img_per_s"]
            for r in report["rows"]
            if r["preset"] == preset and r["framework"] == "torch"
        )
        for preset in presets
    }
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Host: {host.summary(report['host'])}",
        f"MLX side: {report['mlx_backend']}; roofline (best fp32 4096² MLX GEMM, before/after): "
        f"{report['roofline_gflops']:.0f} GFLOP/s",
        "",
        "| preset | framework | batch | s / step | img/s | GFLOP/s | % of roofline | MLX / torch "
        "| round medians |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ratio = (
            f"**{report['mlx_over_torch'][r['preset']]:.2f}×**" if r["framework"] == "mlx" else ""
        )
        name = (
            "MLX (aimv2_mlx, compiled)" if r["framework"] == "mlx" else "PyTorch (eager, reference)"
        )
        lines.append(
            f"| {r['preset']} | {name} | {r['batch']} | {r['s_per_step']:.3f} | "
            f"{r['img_per_s']:.1f} | "
            f"{r['gflop_per_s']:.0f} | {100 * r['roofline_fraction']:.0f}% | {ratio} | "
            + ", ".join(f"{m:.3f}" for m in r["round_medians"])
            + " |"
        )
    busy = [f"{r['preset']} {r['framework']}" for r in report["rows"] if r["max_others_cpu"] > 0.1]
    if busy:
        lines.append(
            "\nWARNING: other processes used > 10% of a CPU during "
            + ", ".join(busy)
            + " (figures may be low)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small,base")
    parser.add_argument("--batch", type=int, default=0, help="0: 64 for tiny, 8 for small and base")
    parser.add_argument("--rounds", type=int, default=2, help="MLX/torch alternations (default 2)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per process (MLX compiles there)"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--plain", action="store_true", help="MLX without the CPU backend (plain MLX layers)"
    )
    parser.add_argument(
        "--check", action="store_true", help="only the reference check, at full preset depth"
    )
    parser.add_argument("--check-batch", type=int, default=2, help="batch of the automatic check")
    parser.add_argument(
        "--check-depth", type=int, default=2, help="encoder blocks of the automatic check"
    )
    parser.add_argument("--json", help="also write the full report as JSON here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for name in ("preset", "spec", "out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-steps", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker in MLX_WORKERS:
            sys.path.insert(0, str(ROOT))
            import aimv2_mlx  # noqa: F401  (loads the system BLAS before MLX)
        host.emit(WORKERS[args.worker](args))
        return
    began = time.perf_counter()
    report = drive(args)
    report["total_s"] = time.perf_counter() - began
    if not args.check:
        print()
        print(markdown(report))
    print(f"\n(total {report['total_s'] / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
