"""`pretrain()`: the training run — set up or resume a run folder, then step, log, checkpoint.

A run folder holds `config.json` (the `PretrainConfig`), `tokenizer.json`, `log.jsonl`,
`loss.png`, `samples/` and `checkpoints/`. With `distributed=True` (under `mlx.launch`) every
rank trains on its own block of each global batch, gradients are summed over ranks, and rank 0
alone writes files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlx.core as mx

from .. import cpu
from ..config import ModelConfig, PreprocessConfig
from ..data.captioned import load_captioned
from ..decoder import MultimodalDecoder
from ..encoder import VisionEncoder
from ..tokenizer import CaptionTokenizer, load_tokenizer
from . import logs
from .batches import BatchPlan
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import PretrainConfig
from .init import init_pretraining
from .optimizer import build_optimizer
from .samples import greedy_captions, reconstruct
from .step import PretrainModel, TrainStep
from .summary import eta, startup_summary


def build_pretrain_model(config: PretrainConfig, data_name: str = "", cpu_backend: bool = True) -> PretrainModel:
    """Encoder + decoder, initialised as the recipe says; with the CPU backend on a CPU
    (`cpu_backend=False`: the plain layers, e.g. as a reference). Its trunks stay on one stream
    each: `TrainStep` shards whole micro-batches over the cores instead."""
    enc = config.encoder
    encoder = VisionEncoder(enc)
    encoder.model_config = ModelConfig(
        name=f"aimv2-{config.preset}-patch{enc.patch_size}-{enc.image_size}-pretrained",
        vision=enc,
        preprocess=PreprocessConfig("ml-aim", enc.image_size, tuple(config.mean), tuple(config.std), 1.0),
        source={"origin": "aimv2 pretrain", "objective": config.objective, "data": data_name},
    )
    decoder = MultimodalDecoder(config.decoder, enc.hidden_size, enc.patch_size ** 2 * enc.num_channels)
    model = PretrainModel(encoder, decoder)
    init_pretraining(model, config.seed)
    if cpu_backend and cpu.on_cpu():
        cpu.apply(model, streams=())
    return model


def pretrain(data, out, config: PretrainConfig | None = None, tokenizer: CaptionTokenizer | None = None,
             resume: bool = False, until: int | None = None, distributed: bool = False, echo=print) -> dict:
    """Train (or resume) the run in `out` on `data` (a path, or any sequence of (image, caption) pairs
    like `CaptionedImages`); returns the last step's log record ({} on ranks other than 0).
    `until` stops early (after writing a checkpoint) without changing the schedule."""
    out = Path(out)
    group = mx.distributed.init() if distributed else None
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    return _train(data, out, config, tokenizer, resume, until, rank, world, group, echo)


def _train(data, out: Path, config, tokenizer, resume: bool, until, rank: int, world: int, group, echo) -> dict:
    source = load_captioned(data) if isinstance(data, (str, os.PathLike)) else data
    if resume:
        if not (out / "config.json").is_file():
            raise FileNotFoundError(f"{out}: no run to resume (no config.json)")
        config = PretrainConfig.from_dict(json.loads((out / "config.json").read_text()))
        tokenizer = load_tokenizer(out / "tokenizer.json", config.decoder.context_length)
    else:
        if config is None or tokenizer is None:
            raise ValueError("a new run needs a config and a tokenizer")
        if rank == 0 and (out / "checkpoints").exists():
            raise FileExistsError(f"{out}: already holds a run; pass --resume to continue it")
        if rank == 0:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            config.save(out / "config.json")
            tokenizer.save(out / "tokenizer.json")
    if tokenizer.vocab_size > config.decoder.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens; the decoder only {config.decoder.vocab_size}")

    model = build_pretrain_model(config, str(getattr(source, "origin", "")))
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    start = 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, model, optimizer)["step"]
        if rank == 0:
            logs.truncate(out / "log.jsonl", start)
        echo(f"resumed {checkpoint} at step {start}")
    all_sum = (lambda x: mx.distributed.all_sum(x, group=group)) if world > 1 else None
    train_step = TrainStep(model, optimizer, config, tokenizer.ignore_ids, all_sum)
    plan = BatchPlan(source, tokenizer, config, rank, world)
    end = config.steps if until is None else min(until, config.steps)
    record: dict = {}
    if rank == 0 and start < end:
        echo(startup_summary(config, model, len(source), out, start, world))
    future = plan.prefetch(start) if start < end else None
    loop_started = time.perf_counter()
    for step in range(start, end):
        batch = future.result()
        future = plan.prefetch(step + 1) if step + 1 < end else None
        began = time.perf_counter()
        stats = train_step(batch)
        seconds = time.perf_counter() - began
        done = step + 1
        record = {"step": done, **stats, "lr": float(optimizer.learning_rate.item()),
                  "img_per_s": plan.global_batch / seconds, "samples_seen": plan.samples_seen(done)}
        if rank != 0:
            continue
        if done % config.log_every == 0 or done == end:
            logs.append(out / "log.jsonl", record)
            echo(f"step {done}/{config.steps} loss {stats['loss']:.4f} (pixel {stats['loss_pixel']:.4f}, "
                 f"text {stats['loss_text']:.4f}) lr {record['lr']:.2e} {record['img_per_s']:.1f} img/s, "
                 f"eta {eta(time.perf_counter() - loop_started, done - start, end - done)}")
        if config.sample_every and done % config.sample_every == 0:
            write_samples(model, batch.micro[0], tokenizer, config, out / "samples" / f"step-{done:08d}")
        if done % config.checkpoint_every == 0 or done == end:
            save_checkpoint(out, done, model, optimizer, {"samples_seen": plan.samples_seen(done), "seed": config.seed,
                                                          "config": config.to_dict()})
    if rank != 0:
        return {}
    logs.plot_losses(out / "log.jsonl", out / "loss.png")
    return record


def write_samples(model, micro, tokenizer, config: PretrainConfig, prefix: Path, count: int = 4) -> None:
    """A reconstruction grid with real and generated captions (PNG), and the captions (JSON)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    pixels = mx.array(micro.pixels[:count])
    real, predicted, tokens = reconstruct(model, pixels, config.objective, config.mean, config.std)
    captions = [""] * len(real)
    if config.objective != "image":
        bidirectional = model.encoder(pixels) if config.objective == "caption" else tokens
        ids = greedy_captions(model, bidirectional, config.decoder.context_length, tokenizer.eos_id)
        captions = [tokenizer.decode(row) for row in ids]
    truth = [tokenizer.decode(row) for row in micro.input_ids[:count]]
    prefix.with_suffix(".json").write_text(json.dumps(
        [{"caption": c, "greedy": g} for c, g in zip(truth, captions)], indent=2) + "\n")
    logs.plot_reconstructions(real, predicted, truth, captions, prefix.with_suffix(".png"))
