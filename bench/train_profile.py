"""Where one compiled AIMv2 pre-training step spends its time, per preset.

    python bench/train_profile.py                        # tiny, small, base (≈ 5 min idle, 2 cores)
    python bench/train_profile.py --presets tiny --repeats 2   # a smoke run (≈ 30 s)
    python bench/train_profile.py --plain --json out.json      # no CPU backend; JSON too

Each preset runs in its own process on the batch sizes of bench/train_step.py. The step is split
into the pieces `aimv2_mlx.train.step.TrainStep` chains, each rebuilt here from the same library
functions and timed alone (median of `--repeats` after one untimed call, which compiles):

* data pipeline: `BatchPlan.step` producing a batch from a small `aimv2 data shapes` dataset
  (decode, random crop, flip, normalise, tokenize) — `pretrain()` prefetches it on a thread
  during the previous step, so it competes for the cores rather than adding to the step;
* host→device copies: `mx.array` of the numpy batch;
* forward: the loss alone (`loss_sums` + `combine`, compiled);
* forward + backward: `mx.value_and_grad` of it, compiled, as the step runs it;
* optimizer: global-norm clip + AdamW, compiled with the model and optimizer state;
* the whole `TrainStep.__call__`, so the parts can be compared with the sum;
* a GEMM estimate: the step's analytic matmul FLOPs (bench/pretrain_throughput.py) / the fp32
  4096² GEMM rate measured in the same process, so "non-GEMM" = forward + backward − estimate
  is the time spent outside matmuls (element-wise ops, copies, reductions; small GEMMs running
  below the 4096² rate count here too).

Then the element-wise pieces alone at the preset's shapes, forward and forward + backward
(`mx.vjp`, compiled): the SwiGLU product (`nn.silu(g) * u`, and `aimv2_mlx.cpu.kernels.silu_mul`
when it exists and unless `--plain`), softmax attention (`mx.fast.scaled_dot_product_attention`
with the encoder's prefix mask and the decoder's causal mask; `kernels.attention` likewise) and
RMSNorm (`mx.fast.rms_norm`),
with their count per step, so "× calls" says how much of the non-GEMM time each one explains.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import host
from pretrain_throughput import CONTEXT, VOCAB, forward_flops, roofline

ROOT = Path(__file__).resolve().parent.parent
BATCHES = {"tiny": 64, "small": 8, "base": 8}
DATASET_IMAGES = 32


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after one untimed call (compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _dataset(folder: Path, image_size: int):
    from aimv2_mlx.data.captioned import load_captioned
    from aimv2_mlx.data.shapes import write_shapes
    from aimv2_mlx.tokenizer import train_tokenizer

    data = write_shapes(folder / "shapes", DATASET_IMAGES, size=image_size)
    source = load_captioned(data)
    return source, train_tokenizer(source.captions(), VOCAB, CONTEXT)


def profile_step(preset: str, batch: int, plain: bool, repeats: int) -> dict:
    """Seconds per piece of one step, and the GEMM estimate."""
    from aimv2_mlx.objective import LossWeights, combine, loss_sums, used_weights
    from aimv2_mlx.train.batches import BatchPlan
    from aimv2_mlx.train.config import PretrainConfig
    from aimv2_mlx.train.loop import build_pretrain_model
    from aimv2_mlx.train.optimizer import build_optimizer
    from aimv2_mlx.train.step import TrainStep

    import mlx.core as mx
    import mlx.optimizers as optim

    config = PretrainConfig.from_preset(preset, VOCAB, CONTEXT, batch_size=batch, steps=1000)
    peak = roofline()
    with tempfile.TemporaryDirectory(prefix="aimv2-profile-") as tmp:
        source, tokenizer = _dataset(Path(tmp), config.encoder.image_size)
        plan = BatchPlan(source, tokenizer, config)
        steps = iter(range(10**6))
        data_s = _median_seconds(lambda: plan.step(next(steps)), repeats)
        sample = plan.step(0)
    micro = sample.micro[0]
    ignore = tokenizer.ignore_ids

    def to_device():
        arrays = mx.array(micro.pixels), mx.array(micro.input_ids), mx.array(micro.prefix_lengths)
        mx.eval(arrays)
        return arrays

    copy_s = _median_seconds(to_device, repeats)
    pixels, ids, prefix = to_device()
    pixel_n, text_n = mx.array(float(sample.pixel_count)), mx.array(float(sample.text_count))

    model = build_pretrain_model(config, cpu_backend=not plain)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    weights = used_weights(config.objective, LossWeights(config.pixel_weight, config.text_weight))
    params = model.trainable_parameters()

    def loss(params, pixels, ids, prefix, pixel_n, text_n):
        model.update(params)
        ps, ts = loss_sums(
            model.encoder, model.decoder, pixels, ids, prefix, config.objective, ignore
        )
        return combine(ps, ts, pixel_n, text_n, weights)

    forward = mx.compile(loss)
    forward_backward = mx.compile(mx.value_and_grad(loss))
    inputs = (params, pixels, ids, prefix, pixel_n, text_n)
    forward_s = _median_seconds(lambda: mx.eval(forward(*inputs)), repeats)
    model.update(params)
    fb_s = _median_seconds(lambda: mx.eval(forward_backward(*inputs)), repeats)
    model.update(params)
    _, grads = forward_backward(*inputs)
    model.update(params)
    mx.eval(grads)

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(gradients):
        gradients, norm = optim.clip_grad_norm(gradients, config.grad_clip)
        optimizer.update(model, gradients)
        return norm

    optimizer_s = _median_seconds(
        lambda: mx.eval(apply(grads), model.parameters(), optimizer.state), repeats
    )
    train_step = TrainStep(model, optimizer, config, ignore)
    step_s = _median_seconds(lambda: train_step(sample), repeats)

    flops = forward_flops(config) * batch
    gemm_s = 3 * flops / (peak * 1e9)
    return {
        "preset": preset,
        "batch": batch,
        "roofline_gflops": peak,
        "data_pipeline_s": data_s,
        "host_to_device_s": copy_s,
        "forward_s": forward_s,
        "forward_backward_s": fb_s,
        "backward_s": fb_s - forward_s,
        "optimizer_s": optimizer_s,
        "train_step_s": step_s,
        "gemm_estimate_forward_s": flops / (peak * 1e9),
        "gemm_estimate_s": gemm_s,
        "non_gemm_s": fb_s - gemm_s,
        "non_gemm_forward_s": forward_s - flops / (peak * 1e9),
    }


def _piece(fn, args: list, repeats: int) -> dict:
    """Forward and forward + backward (vjp against a ones cotangent) seconds per call, compiled."""
    import mlx.core as mx

    forward = mx.compile(fn)
    out = forward(*args)
    cotangent = mx.ones_like(out)
    vjp = mx.compile(lambda *a: mx.vjp(fn, list(a), [cotangent])[1])
    result = {"forward_s": _median_seconds(lambda: mx.eval(forward(*args)), repeats)}
    try:
        result["forward_backward_s"] = _median_seconds(lambda: mx.eval(vjp(*args)), repeats)
    except (ValueError, RuntimeError) as error:  # a kernel without a vjp
        result["forward_backward_s"] = None
        result["backward_error"] = str(error).splitlines()[0][:160]
    return result


def profile_pieces(preset: str, batch: int, plain: bool, repeats: int) -> list[dict]:
    """SwiGLU product, prefix/causal attention and RMSNorm alone at the preset's shapes."""
    from aimv2_mlx.cpu import kernels, settings
    from aimv2_mlx.layers import prefix_mask
    from aimv2_mlx.objective import sample_prefix_lengths
    from aimv2_mlx.train.config import PretrainConfig

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    settings.tune(split=False)  # the cache limit a training run has, for both paths
    config = PretrainConfig.from_preset(preset, VOCAB, CONTEXT, batch_size=batch)
    e, d = config.encoder, config.decoder
    n = e.num_patches
    prefix = mx.array(sample_prefix_lengths(np.random.default_rng(0), batch, n))
    rows = []
    for where, tokens, width, heads, hidden, depth, mask in (
        (
            "encoder",
            n,
            e.hidden_size,
            e.num_attention_heads,
            e.intermediate_size,
            e.num_hidden_layers,
            prefix_mask(prefix, n),
        ),
        (
            "decoder",
            n + 1 + d.context_length,
            d.hidden_size,
            d.num_attention_heads,
            d.intermediate_size,
            d.num_hidden_layers,
            "causal",
        ),
    ):
        gate, up = (
            mx.random.normal((batch, tokens, hidden)),
            mx.random.normal((batch, tokens, hidden)),
        )
        x, weight = mx.random.normal((batch, tokens, width)), mx.ones((width,))
        q, k, v = (mx.random.normal((batch, heads, tokens, width // heads)) for _ in range(3))
        scale = (width // heads) ** -0.5
        pieces = [
            (
                "SwiGLU nn.silu(g)*u",
                (batch, tokens, hidden),
                depth,
                lambda g, u: nn.silu(g) * u,
                [gate, up],
            )
        ]
        if not plain:
            pieces.append(
                (
                    "SwiGLU kernels.silu_mul",
                    (batch, tokens, hidden),
                    depth,
                    kernels.silu_mul,
                    [gate, up],
                )
            )
        label = "prefix" if where == "encoder" else "causal"
        qkv_shape = (batch, heads, tokens, width // heads)
        pieces.append(
            (
                f"attention mx.fast SDPA, {label} mask",
                qkv_shape,
                depth,
                lambda q, k, v, m=mask, s=scale: mx.fast.scaled_dot_product_attention(
                    q, k, v, scale=s, mask=m
                ),
                [q, k, v],
            )
        )
        if not plain:
            allowed = (
                mask
                if where == "encoder"
                else mx.arange(tokens)[None, :] <= mx.arange(tokens)[:, None]
            )
            additive = mx.where(allowed, 0.0, -float("inf"))
            pieces.append(
                (
                    f"attention kernels.attention, {label} mask",
                    qkv_shape,
                    depth,
                    lambda q, k, v, m=additive, s=scale: kernels.attention(q, k, v, s, m),
                    [q, k, v],
                )
            )
        pieces += [
            (
                "RMSNorm mx.fast.rms_norm",
                (batch, tokens, width),
                2 * depth + (2 if where == "encoder" else 1),
                lambda x, w: mx.fast.rms_norm(x, w, e.rms_norm_eps),
                [x, weight],
            ),
        ]
        for name, shape, calls, fn, args in pieces:
            timing = _piece(fn, args, repeats)
            rows.append(
                {
                    "piece": name,
                    "where": where,
                    "shape": list(shape),
                    "calls_per_step": calls,
                    **timing,
                }
            )
    return rows


def worker(args) -> dict:
    return {
        "step": profile_step(args.preset, args.batch, args.plain, args.repeats),
        "pieces": profile_pieces(args.preset, args.batch, args.plain, args.repeats),
    }


def markdown(result: dict) -> str:
    s = result["step"]
    step = s["train_step_s"]
    lines = [
        f"### {s['preset']}, batch {s['batch']} (roofline {s['roofline_gflops']:.0f} GFLOP/s)",
        "",
        "| part | s / step | % of TrainStep |",
        "|---|---|---|",
    ]
    for label, key in (
        ("data pipeline (BatchPlan.step; prefetched during the previous step)", "data_pipeline_s"),
        ("host→device copies (mx.array of the batch)", "host_to_device_s"),
        ("forward (loss, compiled)", "forward_s"),
        ("backward (forward + backward − forward)", "backward_s"),
        ("forward + backward (value_and_grad, compiled)", "forward_backward_s"),
        ("optimizer (clip + AdamW, compiled)", "optimizer_s"),
        ("whole TrainStep", "train_step_s"),
        ("GEMM estimate of forward + backward (FLOPs / roofline)", "gemm_estimate_s"),
        ("non-GEMM = forward + backward − GEMM estimate", "non_gemm_s"),
        ("non-GEMM of the forward alone", "non_gemm_forward_s"),
    ):
        lines.append(f"| {label} | {s[key]:.3f} | {100 * s[key] / step:.0f}% |")
    lines += [
        "",
        "| piece | where | shape | calls / step | fwd ms / call | fwd+bwd ms / call | fwd+bwd × "
        "calls, "
        "s / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["pieces"]:
        fb = p["forward_backward_s"]
        fb_text = f"{1e3 * fb:.2f}" if fb is not None else f"no vjp ({p.get('backward_error', '')})"
        total = f"{fb * p['calls_per_step']:.3f}" if fb is not None else "–"
        lines.append(
            f"| {p['piece']} | {p['where']} | {'×'.join(map(str, p['shape']))} | "
            f"{p['calls_per_step']} "
            f"| {1e3 * p['forward_s']:.2f} | {fb_text} | {total} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small,base")
    parser.add_argument("--batch", type=int, default=0, help="0: 64 for tiny, 8 for small and base")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per piece (median)")
    parser.add_argument(
        "--plain", action="store_true", help="MLX without the CPU backend (plain MLX layers)"
    )
    parser.add_argument("--json", help="also write every figure as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        import aimv2_mlx  # noqa: F401  (loads the system BLAS before MLX)

        host.emit(worker(args))
        return
    facts = host.collect_in_subprocess()
    print(
        f"host: {host.summary(facts)}; MLX side: "
        f"{'plain MLX layers' if args.plain else 'CPU backend'}\n",
        flush=True,
    )
    report = {
        "command": "python bench/train_profile.py " + " ".join(sys.argv[1:]),
        "host": facts,
        "mlx_backend": "plain MLX layers" if args.plain else "CPU backend",
        "presets": [],
    }
    for preset in args.presets.split(","):
        batch = args.batch or BATCHES.get(preset, 8)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "--preset",
            preset,
            "--batch",
            str(batch),
            "--repeats",
            str(args.repeats),
        ] + (["--plain"] if args.plain else [])
        report["presets"].append(host.run_worker(cmd, f"train_profile {preset}"))
        print(markdown(report["presets"][-1]) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
