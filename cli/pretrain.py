"""`aimv2 pretrain DATA -o RUN`: AIMv2 pre-training (multimodal, image-only or caption-only)."""

from __future__ import annotations

import dataclasses
import inspect
import shlex
from pathlib import Path

from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.errors import SettingError
from aimv2_mlx.objective import OBJECTIVES
from aimv2_mlx.tokenizer import load_tokenizer, train_tokenizer
from aimv2_mlx.train.config import DTYPES, RESUMABLE, SIZES, PretrainConfig
from aimv2_mlx.train.init import L3mStart
from aimv2_mlx.train.loop import TrainingInterrupted, check_new_run
from aimv2_mlx.train.loop import pretrain as run_pretraining

import typer

from .errors import one_line_errors
from .options import above_zero, at_least, given_options, output_folder, resume_changes

# The defaults of the options that are PretrainConfig fields, and of the tokenizer a run trains:
# taken from the library, which owns them.
DEFAULTS = {
    field.name: field.default
    for field in dataclasses.fields(PretrainConfig)
    if field.default is not dataclasses.MISSING
}
TOKENIZER_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(train_tokenizer).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}

# Options that say how to run a resumed run rather than what the run is.
WITH_RESUME = ("data", "out", "resume", "distributed", "strict", "allow_data_change")
# Sizes an --init-from checkpoint fixes (heads are not in a checkpoint: those may be given).
FROM_CHECKPOINT = (
    "preset",
    "image_size",
    "width",
    "depth",
    "decoder_width",
    "decoder_depth",
    "context_length",
)


def pretrain(
    ctx: typer.Context,
    data: Path = typer.Argument(
        ..., help="Captioned data: folder with .txt sidecars, .jsonl/.csv, or .tar shards."
    ),
    out: Path = typer.Option(
        ..., "-o", "--output", "--out", help="Run folder (config, tokenizer, logs, checkpoints)."
    ),
    preset: str = typer.Option(DEFAULTS["preset"], help=f"Model size: {', '.join(SIZES)}."),
    objective: str = typer.Option(
        DEFAULTS["objective"], help=f"{' | '.join(OBJECTIVES)} (the paper's ablation)."
    ),
    steps: int = typer.Option(
        DEFAULTS["steps"], help="Total optimizer steps (the cosine schedule's length)."
    ),
    batch_size: int = typer.Option(
        DEFAULTS["batch_size"], "-b", "--batch-size", help="Images per micro-batch per process."
    ),
    accumulation: int = typer.Option(
        DEFAULTS["accumulation"], help="Micro-batches per optimizer step."
    ),
    warmup_steps: int = typer.Option(
        DEFAULTS["warmup_steps"], help="Linear warmup steps before the cosine decay."
    ),
    lr: float = typer.Option(DEFAULTS["peak_lr"], help="Peak learning rate."),
    end_lr: float = typer.Option(
        DEFAULTS["end_lr"], help="Learning rate at the end of the cosine decay."
    ),
    weight_decay: float = typer.Option(
        DEFAULTS["weight_decay"], help="AdamW decay (PyTorch semantics, p *= 1 - lr*wd)."
    ),
    pixel_weight: float = typer.Option(
        DEFAULTS["pixel_weight"], help="Weight of the pixel (MSE) loss in the total."
    ),
    text_weight: float = typer.Option(
        DEFAULTS["text_weight"], help="Weight of the caption (cross-entropy) loss in the total."
    ),
    dtype: str = typer.Option(
        DEFAULTS["dtype"], help=f"{' | '.join(DTYPES)} (compute; fp32 masters and losses)."
    ),
    compile: bool = typer.Option(
        DEFAULTS["compile"], "--compile/--no-compile", help="mx.compile the step."
    ),
    seed: int = typer.Option(
        DEFAULTS["seed"], help="Seed of the initial weights and the data order."
    ),
    image_size: int = typer.Option(None, help="Override the preset's image size."),
    width: int = typer.Option(None, help="Override the encoder width."),
    depth: int = typer.Option(None, help="Override the encoder depth."),
    heads: int = typer.Option(None, help="Override the encoder heads."),
    decoder_width: int = typer.Option(None, help="Override the decoder width."),
    decoder_depth: int = typer.Option(None, help="Override the decoder depth."),
    decoder_heads: int = typer.Option(None, help="Override the decoder heads."),
    tokenizer: Path = typer.Option(
        None, help="tokenizer.json to use; default: train a BPE on the captions."
    ),
    vocab_size: int = typer.Option(
        TOKENIZER_DEFAULTS["vocab_size"], help="BPE size when training a tokenizer."
    ),
    context_length: int = typer.Option(
        TOKENIZER_DEFAULTS["context_length"],
        help="Caption tokens per image (longer captions are cut).",
    ),
    checkpoint_every: int = typer.Option(
        DEFAULTS["checkpoint_every"],
        help="Save a checkpoint every K steps (and at the end and on Ctrl-C).",
    ),
    checkpoint_minutes: float = typer.Option(
        DEFAULTS["checkpoint_minutes"],
        help="Also save a checkpoint when this many minutes have passed "
        "since the last one (0: off).",
    ),
    log_every: int = typer.Option(
        DEFAULTS["log_every"], help="Print and log the losses every K steps."
    ),
    sample_every: int = typer.Option(
        DEFAULTS["sample_every"],
        help="Reconstruction grid + greedy captions every K steps (0: off).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --output from its latest checkpoint; "
        "may change --steps (the cosine decay then ends at the new last step) and "
        "--checkpoint-every, --checkpoint-minutes, --log-every, --sample-every.",
    ),
    distributed: bool = typer.Option(
        False, "--distributed", help="Data-parallel over mlx.launch ranks."
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Stop at an unreadable image instead of replacing it "
        "(replaced ones are listed in failures.jsonl).",
    ),
    allow_data_change: bool = typer.Option(
        False, "--allow-data-change", help="With --resume: continue on data other than the run's."
    ),
    init_from: Path = typer.Option(
        None,
        "--init-from",
        help="Start from an apple/ml-l3m checkpoint (the consolidated "
        "torch.save file): its sizes, encoder and decoder, and its AdamW state and step (the "
        "run continues there) when it has them.",
    ),
    init_weights_only: bool = typer.Option(
        False,
        "--init-weights-only",
        help="With --init-from: its weights only; the run starts at step 0.",
    ),
) -> None:
    """Pre-train an AIMv2 encoder + decoder on image + caption pairs."""
    with one_line_errors():
        at_least(
            1,
            steps=steps,
            batch_size=batch_size,
            accumulation=accumulation,
            image_size=image_size,
            width=width,
            depth=depth,
            heads=heads,
            decoder_width=decoder_width,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
        )
        at_least(2, context_length=context_length)
        at_least(3, vocab_size=vocab_size)
        at_least(
            0,
            warmup_steps=warmup_steps,
            end_lr=end_lr,
            weight_decay=weight_decay,
            pixel_weight=pixel_weight,
            text_weight=text_weight,
            sample_every=sample_every,
            checkpoint_minutes=checkpoint_minutes,
        )
        above_zero(lr=lr)
        given = given_options(ctx)
        changes = resume_changes(ctx.params, given, out, RESUMABLE, WITH_RESUME) if resume else None
        if not resume and warmup_steps > steps and "warmup_steps" not in given:
            warmup_steps = steps // 10
            typer.echo(
                f"note: the default warmup ({ctx.params['warmup_steps']} steps) is longer than "
                "this "
                f"{steps}-step run; warming up for {warmup_steps} steps (a tenth of the run)"
            )
        output_folder(out)
        if not resume:
            check_new_run(out)  # before reading the data or training a tokenizer
        start_from = _start_from(init_from, init_weights_only, given)
        if start_from is not None:
            context_length = start_from.sizes()[1].context_length
            if tokenizer is None and not resume:
                typer.echo(
                    f"note: no --tokenizer: a BPE trained on these captions gives ids the "
                    f"decoder of {init_from} never saw; pass the tokenizer.json its run used"
                )
        source = load_captioned(data)
        config = tok = None
        if not resume:
            tok = (
                load_tokenizer(tokenizer, context_length)
                if tokenizer
                else train_tokenizer(
                    source.captions(), vocab_size, context_length, report=typer.echo
                )
            )
            config = PretrainConfig.from_preset(
                preset,
                tok.vocab_size,
                context_length,
                image_size=image_size,
                width=width,
                depth=depth,
                heads=heads,
                decoder_width=decoder_width,
                decoder_depth=decoder_depth,
                decoder_heads=decoder_heads,
                objective=objective,
                steps=steps,
                batch_size=batch_size,
                accumulation=accumulation,
                warmup_steps=warmup_steps,
                peak_lr=lr,
                end_lr=end_lr,
                weight_decay=weight_decay,
                pixel_weight=pixel_weight,
                text_weight=text_weight,
                dtype=dtype,
                compile=compile,
                seed=seed,
                checkpoint_every=checkpoint_every,
                log_every=log_every,
                sample_every=sample_every,
                checkpoint_minutes=checkpoint_minutes,
            )
            if start_from is not None:
                config = start_from.config(config, heads, decoder_heads)
            config.check()
        try:
            record = run_pretraining(
                source,
                out,
                config,
                tok,
                resume=resume,
                distributed=distributed,
                echo=typer.echo,
                strict=strict,
                allow_data_change=allow_data_change,
                changes=changes,
                init_from=start_from,
            )
        except TrainingInterrupted as stop:
            typer.echo(
                f"interrupted at step {stop.step}; continue with: "
                f"{resume_command(data, out, strict, distributed)}",
                err=True,
            )
            raise typer.Exit(stop.exit_code) from None
    if record:
        typer.echo(
            f"done: step {record['step']}, loss {record['loss']:.4f}; checkpoints in "
            f"{out / 'checkpoints'}"
        )


def _start_from(init_from: Path | None, weights_only: bool, given: set[str]) -> L3mStart | None:
    """The --init-from checkpoint, opened (names and shapes only); size flags are refused."""
    if init_from is None:
        if weights_only:
            raise SettingError("--init-weights-only applies only with --init-from")
        return None
    fixed = sorted(given & set(FROM_CHECKPOINT))
    if fixed:
        flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
        raise SettingError(f"{flags}: with --init-from the sizes are those of {init_from}")
    return L3mStart(init_from, with_optimizer=not weights_only)


def resume_command(data: Path, out: Path, strict: bool, distributed: bool) -> str:
    """The command line that continues this run (for --distributed, under the same mlx.launch)."""
    flags = ["--strict"] * strict + ["--distributed"] * distributed
    return shlex.join(["aimv2", "pretrain", str(data), "-o", str(out), "--resume", *flags])
