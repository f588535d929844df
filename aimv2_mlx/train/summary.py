"""What a pre-training run tells its user: a start-up summary (model, data, schedule, where the
outputs go) before the first step, and the time left in each step line."""

from __future__ import annotations

from pathlib import Path

from ..model import parameter_count
from .config import PretrainConfig


def startup_summary(
    config: PretrainConfig, model, images: int, out: Path, start: int, world: int = 1
) -> str:
    """Four lines: model and parameters, data and schedule, checkpoints, outputs."""
    encoder, decoder = parameter_count(model.encoder), parameter_count(model.decoder)
    name = model.encoder.config.name
    enc = config.encoder
    batch = config.global_batch * world
    epochs = config.steps * batch / max(images, 1)
    schedule = (
        f"{config.steps} steps"
        + (f" (resuming at step {start})" if start else "")
        + f" of batch {batch}"
        + (
            f" ({config.batch_size} x {config.accumulation} accumulation"
            + (f" x {world} ranks" if world > 1 else "")
            + ")"
            if config.accumulation > 1 or world > 1
            else ""
        )
        + f", ~{epochs:.1f} epochs; lr {config.peak_lr:g}, warmup {config.warmup_steps} steps"
    )
    samples = f", samples/ every {config.sample_every} steps" if config.sample_every else ""
    return "\n".join(
        [
            f"model: {name} ({enc.hidden_size} wide, {enc.num_hidden_layers} blocks, "
            f"{enc.image_size}px), "
            f"{config.objective} objective: {encoder:,} encoder + {decoder:,} decoder parameters",
            f"data: {images:,} images; {schedule}",
            f"outputs in {out}/: log.jsonl every {config.log_every} steps, loss.png{samples}, "
            f"checkpoints/ every {config.checkpoint_every} steps"
            + (f" or {config.checkpoint_minutes:g} minutes" if config.checkpoint_minutes else "")
            + ", at the end and on Ctrl-C",
        ]
    )


def eta(seconds_so_far: float, done: int, remaining: int) -> str:
    """Time left at the mean pace so far, as 1h02m, 3m05s or 12s."""
    left = round(seconds_so_far / max(done, 1) * remaining)
    hours, rest = divmod(left, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
