"""`pretrain()`: the training run — set up or resume a run folder, then step, log, checkpoint.

A run folder holds `config.json` (the `PretrainConfig`), `tokenizer.json`, `data.json` (the data's
size and sample digest), `log.jsonl`, `failures.jsonl` (samples replaced because they were
unreadable), `loss.png`, `samples/` and `checkpoints/`; a new run starts only in a new or empty
folder, and rank 0 holds the folder's lock while it runs. With `distributed=True` (under
`mlx.launch`) every rank trains on its own block of each global batch, gradients are summed over
ranks, and rank 0 alone writes files.

SIGINT and SIGTERM stop a run after the step in flight, with a checkpoint at that step, by raising
`TrainingInterrupted`; a second signal acts as it would have without us.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import mlx.core as mx

from .. import cpu
from ..config import ModelConfig, PreprocessConfig
from ..data.captioned import load_captioned
from ..decoder import MultimodalDecoder
from ..encoder import VisionEncoder
from ..errors import SettingError, UnusableFileError
from ..folders import is_empty, locked, naming_full_disk, write_json
from ..tokenizer import CaptionTokenizer, load_tokenizer
from . import logs
from .batches import BatchPlan
from .checkpoint import load_checkpoint, resume_point, save_checkpoint
from .config import RESUMABLE, PretrainConfig
from .init import L3mStart, init_pretraining
from .optimizer import build_optimizer, schedule
from .samples import greedy_captions, reconstruct
from .step import PretrainModel, TrainStep
from .summary import eta, startup_summary

DATA = "data.json"  # the size and sample-list digest of the data the run trains on
FAILURES = "failures.jsonl"  # unreadable samples, each with the step that first drew it


class TrainingInterrupted(Exception):
    """A signal stopped the run after `step`; rank 0 saved `checkpoint` there (None on other
    ranks).
    """

    def __init__(self, step: int, signum: int, checkpoint: Path | None):
        super().__init__(
            f"interrupted at step {step} by {signal.Signals(signum).name}"
            + (f"; checkpoint {checkpoint}" if checkpoint else "")
        )
        self.step, self.signum, self.checkpoint = step, signum, checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


@contextlib.contextmanager
def caught_signals():
    """A list that SIGINT/SIGTERM append to instead of stopping the process mid-step; the first
    signal puts the previous handlers back, so a second one stops the process as before."""
    caught: list[int] = []
    # only the main thread may set handlers
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def note(number, _frame):
        caught.append(number)
        for other, handler in previous.items():
            signal.signal(other, handler)

    for number in previous:
        signal.signal(number, note)
    try:
        yield caught
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def build_pretrain_model(
    config: PretrainConfig, data_name: str = "", cpu_backend: bool = True
) -> PretrainModel:
    """Encoder + decoder, initialised as the recipe says; with the CPU backend on a CPU
    (`cpu_backend=False`: the plain layers, e.g. as a reference)."""
    enc = config.encoder
    encoder = VisionEncoder(
        ModelConfig(
            name=f"aimv2-{config.preset}-patch{enc.patch_size}-{enc.image_size}-pretrained",
            vision=enc,
            preprocess=PreprocessConfig(
                "ml-aim", enc.image_size, tuple(config.mean), tuple(config.std), 1.0
            ),
            source={"origin": "aimv2 pretrain", "objective": config.objective, "data": data_name},
        )
    )
    decoder = MultimodalDecoder(
        config.decoder, enc.hidden_size, enc.patch_size**2 * enc.num_channels
    )
    model = PretrainModel(encoder, decoder)
    init_pretraining(model, config.seed)
    if cpu_backend and cpu.on_cpu():
        cpu.apply(model, training=True)
    return model


def pretrain(
    data,
    out,
    config: PretrainConfig | None = None,
    tokenizer: CaptionTokenizer | None = None,
    resume: bool = False,
    until: int | None = None,
    distributed: bool = False,
    echo=print,
    strict: bool = False,
    allow_data_change: bool = False,
    changes: dict | None = None,
    init_from=None,
    init_weights_only: bool = False,
) -> dict:
    """Train (or resume) the run in `out` on `data` (a path, or any sequence of (image, caption)
    pairs
    like `CaptionedImages`); returns the last step's log record ({} on ranks other than 0).
    `until` stops early (after writing a checkpoint) without changing the schedule. Unreadable
    samples are replaced and listed in failures.jsonl (`strict`: stop instead); resuming on data
    other than the run's (size or sample list) is refused unless `allow_data_change`. `changes`
    (with `resume`): new values of the `RESUMABLE` settings; a new `steps` lengthens or shortens
    the run, and the cosine decay is recomputed to end at the new last step. SIGINT/SIGTERM raise
    `TrainingInterrupted` after saving a checkpoint at the step just finished. `init_from`: an
    ml-l3m checkpoint (a path or an `L3mStart`) a new run starts from: its weights, and its AdamW
    state and step unless `init_weights_only`."""
    out = Path(out).expanduser()
    group = mx.distributed.init() if distributed else None
    rank = group.rank() if group is not None else 0
    check_changes(changes, resume, RESUMABLE)
    if config is not None and not resume:
        config.check()  # before the run folder (and its lock) exists
    if init_from is not None and resume:
        raise SettingError(
            "--init-from starts a new run; --resume goes on from the run's checkpoint"
        )
    start_from = init_from
    if init_from is not None and not isinstance(init_from, L3mStart):
        start_from = L3mStart(init_from, with_optimizer=not init_weights_only)
    if resume and not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out}: no run to resume (no config.json)")
    if rank == 0 and not resume:
        check_new_run(out)  # before rank 0 takes the folder's lock (and so creates it)
    with locked(out) if rank == 0 else contextlib.nullcontext():
        return _run(
            data,
            out,
            config,
            tokenizer,
            resume=resume,
            until=until,
            group=group,
            echo=echo,
            strict=strict,
            allow_data_change=allow_data_change,
            changes=changes or {},
            start_from=start_from,
        )


def check_changes(changes: dict | None, resume: bool, resumable: tuple[str, ...]) -> None:
    """Refuse `changes` to a new run (its config holds them) or to a setting a run keeps."""
    if changes and not resume:
        raise SettingError(
            "changes apply to a resumed run only; a new run takes them in its config"
        )
    unknown = sorted(set(changes or ()) - set(resumable))
    if unknown:
        raise SettingError(
            f"a resumed run keeps its {', '.join(unknown)} (config.json); "
            f"only {', '.join(resumable)} can change"
        )


def check_new_run(out: Path) -> None:
    """A new run goes into a new or empty folder only (never among a user's files)."""
    if (out / "checkpoints").is_dir() and (out / "config.json").is_file():
        raise FileExistsError(f"{out}: already holds a run; pass --resume to continue it")
    if not is_empty(out):
        raise FileExistsError(
            f"{out}: not empty and not an aimv2 pretrain run folder; "
            "choose a new or empty run folder"
        )


def _read_run(out: Path) -> tuple[PretrainConfig, CaptionTokenizer]:
    if not ((out / "config.json").is_file() and (out / "checkpoints").is_dir()):
        raise FileNotFoundError(f"{out}: no run to resume (no config.json and checkpoints/)")
    try:
        config = PretrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UnusableFileError(
            f"{out / 'config.json'}: not a pretrain run config ({type(exc).__name__}: {exc})"
        ) from None
    return config, load_tokenizer(out / "tokenizer.json", config.decoder.context_length)


def data_identity(source) -> dict:
    """The data a run trains on: its size and a digest of its sample names, in order."""
    samples = getattr(source, "samples", None)
    digest = None
    if samples is not None:
        names = "\n".join(str(getattr(sample, "name", sample)) for sample in samples)
        digest = hashlib.sha256(names.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return {"origin": str(getattr(source, "origin", "")), "samples": len(source), "sha256": digest}


def check_data(out: Path, identity: dict, allow_change: bool, echo) -> None:
    """Refuse (or, allowed, announce) resuming on data other than the run's."""
    path = out / DATA
    try:
        recorded = json.loads(path.read_text())
        before = (recorded["samples"], recorded["sha256"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, KeyError):
        if not allow_change:
            raise UnusableFileError(
                f"{path}: unreadable (it records the data this run was trained on); "
                "pass --allow-data-change to continue on this data"
            ) from None
        echo(f"warning: {path}: unreadable; continuing on {identity['origin']}")
        return
    if before == (identity["samples"], identity["sha256"]):
        return
    what = (
        f"{identity['origin']}: {identity['samples']} samples (digest {identity['sha256']}), but "
        "the run "
        f"was trained on {before[0]} (digest {before[1]})"
    )
    if not allow_change:
        raise SettingError(f"{what}; pass --allow-data-change to continue on this data")
    echo(f"warning: {what}; continuing on the new data")


def changed_config(config: PretrainConfig, changes: dict, start: int, echo) -> PretrainConfig:
    """The resumed run's config with `changes`; a new length is refused when it is behind the
    checkpoint, and otherwise announced with the learning rate it moves to at `start`."""
    new = dataclasses.replace(config, **changes)
    if new.steps == config.steps:
        return new
    if new.steps < start:
        raise SettingError(
            f"--steps {new.steps}: the run is already at step {start}; give at least {start}"
        )
    new.check_schedule()
    before, after = (float(schedule(c)(mx.array(start)).item()) for c in (config, new))
    echo(
        f"the run now ends at step {new.steps} (was {config.steps}): the cosine decay is "
        "recomputed to reach "
        f"--end-lr at step {new.steps}, so the learning rate at step {start} goes from "
        f"{before:.2e} to {after:.2e}"
    )
    return new


def _run(
    data,
    out: Path,
    config: PretrainConfig | None,
    tokenizer: CaptionTokenizer | None,
    *,
    resume: bool,
    until: int | None,
    group,
    echo,
    strict: bool,
    allow_data_change: bool,
    changes: dict,
    start_from: L3mStart | None = None,
) -> dict:
    """The body of `pretrain`, on one rank of `group` (None: a single process)."""
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    source = load_captioned(data) if isinstance(data, (str, os.PathLike)) else data
    if resume:
        config, tokenizer = _read_run(out)
        recorded = config
        config = dataclasses.replace(config, **changes)
    elif config is None or tokenizer is None:
        raise SettingError("a new run needs a config and a tokenizer")
    # checked before a new run's folder is made
    if tokenizer.vocab_size > config.decoder.vocab_size:
        raise SettingError(
            f"tokenizer has {tokenizer.vocab_size} tokens; the decoder only "
            f"{config.decoder.vocab_size}"
        )
    if start_from is not None:
        start_from.check(config, config.steps)
    if not resume and rank == 0:
        check_new_run(out)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for name, item in (("config.json", config), ("tokenizer.json", tokenizer)):
            with naming_full_disk(out / name):
                item.save(out / name)
    identity = data_identity(source)
    if resume:
        check_data(out, identity, allow_data_change, echo)

    model = build_pretrain_model(config, str(getattr(source, "origin", "")))
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    start = 0
    checkpoint, note = resume_point(out) if resume else (None, None)
    if note:
        echo(note)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, model, optimizer)["step"]
        echo(f"resumed {checkpoint} at step {start}")
    if start_from is not None:
        echo(start_from.apply(model, optimizer))
        start = start_from.step
        model.encoder.config.source["init_from"] = str(start_from.path)
    if resume:
        config = changed_config(recorded, changes, start, echo)
        if rank == 0 and config != recorded:
            with naming_full_disk(out / "config.json"):
                config.save(out / "config.json")
    if rank == 0:
        write_json(out / DATA, identity)
    if resume and rank == 0:
        logs.truncate(out / "log.jsonl", start)
        logs.truncate(out / FAILURES, start)
    failed = {f["sample"] for f in logs.read(out / FAILURES)} if rank == 0 else set()
    all_sum = (lambda x: mx.distributed.all_sum(x, group=group)) if world > 1 else None
    train_step = TrainStep(model, optimizer, config, tokenizer.ignore_ids, all_sum)
    plan = BatchPlan(source, tokenizer, config, rank, world, strict=strict)
    end = config.steps if until is None else min(until, config.steps)
    record: dict = {}
    if rank == 0 and start < end:
        echo(startup_summary(config, model, len(source), out, start, world))
    if rank == 0 and resume and start >= config.steps:
        echo(
            f"{out}: the run is complete ({start} of {config.steps} steps); pass --steps N to "
            "extend it"
        )
    future = plan.prefetch(start) if start < end else None
    loop_started = last_save = time.perf_counter()
    saved = None  # the newest checkpoint this loop wrote (rank 0)
    with caught_signals() as caught:
        for step in range(start, end):
            # img/s counts waiting for the batch too: the data pipeline's cost shows
            began = time.perf_counter()
            batch = future.result()
            future = plan.prefetch(step + 1) if step + 1 < end else None
            stats = train_step(batch)
            seconds = time.perf_counter() - began
            done = step + 1
            record = {
                "step": done,
                **stats,
                "lr": float(optimizer.learning_rate.item()),
                "img_per_s": plan.global_batch / seconds,
                "samples_seen": plan.samples_seen(done),
            }
            stop = stop_now(caught, all_sum)
            if rank == 0:
                _report(record, batch, failed, out, config, end, echo, loop_started, start)
                if config.sample_every and done % config.sample_every == 0:
                    prefix = out / "samples" / f"step-{done:08d}"
                    with naming_full_disk(prefix.with_suffix(".png")):
                        write_samples(model, batch.micro[0], tokenizer, config, prefix)
                if checkpoint_due(config, done, end, stop, last_save):
                    saved = _save(out, done, model, optimizer, plan, config, identity)
                    last_save = time.perf_counter()
            if stop and done < end:  # at the last step the run is simply complete
                raise TrainingInterrupted(done, caught[0] if caught else signal.SIGINT, saved)
    if rank != 0:
        return {}
    with naming_full_disk(out / "loss.png"):
        logs.plot_losses(out / "log.jsonl", out / "loss.png")
    return record


def checkpoint_due(config, done: int, end: int, stop: bool, last_save: float) -> bool:
    """Save after this step: stopping, every `checkpoint_every` steps, at the end, or when
    `checkpoint_minutes` have passed since the last save (`last_save`, a perf_counter time)."""
    minutes = config.checkpoint_minutes
    return bool(
        stop
        or done % config.checkpoint_every == 0
        or done == end
        or (minutes and time.perf_counter() - last_save >= 60 * minutes)
    )


def stop_now(caught: list[int], all_sum) -> bool:
    """Whether a signal arrived; with several ranks, on any of them (all stop at the same step)."""
    if all_sum is None:
        return bool(caught)
    return all_sum(mx.array(len(caught))).item() > 0


def _report(
    record: dict,
    batch,
    failed: set,
    out: Path,
    config: PretrainConfig,
    end: int,
    echo,
    loop_started: float,
    start: int,
) -> None:
    """Rank 0's bookkeeping of a step: new unreadable samples, and the log line every `log_every`
    steps.
    """
    done = record["step"]
    for failure in batch.failures:
        if failure["sample"] not in failed:
            failed.add(failure["sample"])
            logs.append(out / FAILURES, failure)
    record["skipped"] = len(failed)
    if done % config.log_every == 0 or done == end:
        logs.append(out / "log.jsonl", record)
        skipped = f"; {len(failed)} unreadable samples replaced (failures.jsonl)" if failed else ""
        echo(
            f"step {done}/{config.steps} loss {record['loss']:.4f} (pixel "
            f"{record['loss_pixel']:.4f}, "
            f"text {record['loss_text']:.4f}) lr {record['lr']:.2e} {record['img_per_s']:.1f} "
            f"img/s{skipped}, "
            f"eta {eta(time.perf_counter() - loop_started, done - start, end - done)}"
        )


def _save(
    out: Path, done: int, model, optimizer, plan: BatchPlan, config: PretrainConfig, identity: dict
) -> Path:
    return save_checkpoint(
        out,
        done,
        model,
        optimizer,
        {
            "samples_seen": plan.samples_seen(done),
            "seed": config.seed,
            "config": config.to_dict(),
            "data": identity,
        },
    )


def write_samples(
    model, micro, tokenizer, config: PretrainConfig, prefix: Path, count: int = 4
) -> None:
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
    prefix.with_suffix(".json").write_text(
        json.dumps(
            [{"caption": c, "greedy": g} for c, g in zip(truth, captions, strict=True)], indent=2
        )
        + "\n"
    )
    logs.plot_reconstructions(real, predicted, truth, captions, prefix.with_suffix(".png"))
