"""`aimv2 lit DATA -o RUN --encoder MODEL`: LiT-tuning, a text tower for a locked image encoder."""

from __future__ import annotations

import shlex
from pathlib import Path

from aimv2_mlx.lit_tuning import LitConfig, lit_tune
from aimv2_mlx.lit_tuning.config import RESUMABLE
from aimv2_mlx.model import load
from aimv2_mlx.train.loop import TrainingInterrupted, check_new_run

import typer

from .errors import one_line_errors
from .options import above_zero, at_least, given_options, output_folder, resume_changes

# Options that say how to run a resumed run rather than what the run is.
WITH_RESUME = ("data", "out", "resume", "distributed", "allow_data_change", "encoder")


def lit(
    ctx: typer.Context,
    data: Path = typer.Argument(
        ..., help="Captioned data: folder with .txt sidecars, .jsonl/.csv, or .tar shards."
    ),
    out: Path = typer.Option(
        ...,
        "-o",
        "--output",
        "--out",
        help="Run folder (config, tokenizer, features, logs, checkpoints).",
    ),
    encoder: str = typer.Option(
        "bundled",
        "--encoder",
        "-m",
        help="The image encoder to lock: model folder, hub id or 'bundled'.",
    ),
    steps: int = typer.Option(1000, help="Total optimizer steps (the cosine schedule's length)."),
    batch_size: int = typer.Option(
        64, "-b", "--batch-size", help="Pairs per contrastive batch per process."
    ),
    warmup_steps: int = typer.Option(
        100,
        help="Linear warmup steps before the cosine decay (default: 100 or a "
        "tenth of --steps, whichever is shorter).",
    ),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    end_lr: float = typer.Option(1e-5, help="Learning rate at the end of the cosine decay."),
    weight_decay: float = typer.Option(
        0.1, help="AdamW decay (PyTorch semantics, p *= 1 - lr*wd)."
    ),
    text_width: int = typer.Option(None, help="Text tower width (default: the encoder's)."),
    text_depth: int = typer.Option(None, help="Text tower blocks (default: half the encoder's)."),
    text_heads: int = typer.Option(None, help="Text tower heads (default: the encoder's)."),
    projection_dim: int = typer.Option(
        None, help="Joint embedding size (default: the text width)."
    ),
    context_length: int = typer.Option(
        77, help="Caption tokens, start and end included (longer ones are cut)."
    ),
    tokenizer: Path = typer.Option(
        None,
        help="A Hugging Face tokenizer.json (or its folder; BPE, Unigram, …: its own EOS and "
        "pad ids) or a folder with CLIP BPE files (vocab.json + merges.txt); default: learn a "
        "CLIP BPE on the captions.",
    ),
    vocab_size: int = typer.Option(1024, help="BPE size when learning a tokenizer (at least 514)."),
    feature_dtype: str = typer.Option(
        "float32", help="float32 | float16: how the cached encoder tokens are stored."
    ),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="mx.compile the step."),
    seed: int = typer.Option(0, help="Seed of the initial weights and the data order."),
    checkpoint_every: int = typer.Option(
        100, help="Save a checkpoint every K steps (and at the end and on Ctrl-C)."
    ),
    checkpoint_minutes: float = typer.Option(
        10.0, help="Also save when this many minutes have passed since the last save (0: off)."
    ),
    log_every: int = typer.Option(10, help="Print and log the loss every K steps."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --output from its latest checkpoint; "
        "may change --steps, --checkpoint-every, --checkpoint-minutes, --log-every.",
    ),
    distributed: bool = typer.Option(
        False, "--distributed", help="Data-parallel over mlx.launch ranks."
    ),
    allow_data_change: bool = typer.Option(
        False, "--allow-data-change", help="With --resume: continue on data other than the run's."
    ),
) -> None:
    """LiT-tune: train a text tower against a locked image encoder on image + caption pairs."""
    with one_line_errors():
        at_least(
            1,
            steps=steps,
            batch_size=batch_size,
            text_width=text_width,
            text_depth=text_depth,
            text_heads=text_heads,
            projection_dim=projection_dim,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
        )
        at_least(2, batch_size=batch_size)
        at_least(3, context_length=context_length)
        at_least(
            0,
            warmup_steps=warmup_steps,
            end_lr=end_lr,
            weight_decay=weight_decay,
            checkpoint_minutes=checkpoint_minutes,
        )
        above_zero(lr=lr)
        given = given_options(ctx)
        changes = resume_changes(ctx.params, given, out, RESUMABLE, WITH_RESUME) if resume else None
        output_folder(out)
        config = None
        if not resume:
            check_new_run(out)  # before loading the encoder
            timing = {"warmup_steps": warmup_steps} if "warmup_steps" in given else {}
            config = LitConfig.for_encoder(
                encoder,
                load(encoder).config.vision,
                text_width,
                text_depth,
                text_heads,
                projection_dim,
                context_length,
                vocab_size,
                batch_size=batch_size,
                steps=steps,
                peak_lr=lr,
                end_lr=end_lr,
                weight_decay=weight_decay,
                feature_dtype=feature_dtype,
                compile=compile,
                seed=seed,
                checkpoint_every=checkpoint_every,
                checkpoint_minutes=checkpoint_minutes,
                log_every=log_every,
                **timing,
            )
            config.check()
        try:
            record = lit_tune(
                data,
                out,
                config,
                tokenizer,
                resume=resume,
                distributed=distributed,
                echo=typer.echo,
                allow_data_change=allow_data_change,
                changes=changes,
            )
        except TrainingInterrupted as stop:
            flags = ["--distributed"] * distributed
            typer.echo(
                f"interrupted at step {stop.step}; continue with: "
                f"{shlex.join(['aimv2', 'lit', str(data), '-o', str(out), '--resume', *flags])}",
                err=True,
            )
            raise typer.Exit(stop.exit_code) from None
    if record:
        typer.echo(
            f"done: step {record['step']}, loss {record['loss']:.4f}; "
            f"`aimv2 export {out} OUT` writes the "
            "LiT model"
        )
