"""`lit_tune()`: a LiT-tuning run — set up or resume a run folder, cache the locked encoder's
features, then step, log and checkpoint, as `aimv2 pretrain` does (and with its pieces).

A run folder holds `config.json` (the `LitConfig`, `kind: "aimv2 lit"`), `tokenizer/` (CLIP BPE
files learned on the captions or copied from those given, or any other Hugging Face
`tokenizer.json` given, saved with its EOS and pad ids), `data.json`, `images.txt` and
`features/` (the cached encoder tokens, an `aimv2 embed` folder), `log.jsonl`, `loss.png` and
`checkpoints/step-N/` (`lit.safetensors`: the trained weights; `optimizer.safetensors`;
`state.json`). The batch of step s is a function of (seed, s) alone, so a resumed run continues
exactly; rank 0 holds the folder's lock and writes every file; SIGINT/SIGTERM save a checkpoint
after the step in flight and raise `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .. import distributed as ranks
from ..data.captioned import load_captioned
from ..embed import model_identity, same_model
from ..errors import SettingError, UnusableFileError
from ..folders import locked, naming_full_disk
from ..model import load, parameter_count
from ..text_embed import trim_padding
from ..tokenizer import TOKENIZER_CONFIG, CaptionTokenizer, text_tokenizer
from ..train import logs
from ..train.checkpoint import resume_point, write_checkpoint
from ..train.loop import (
    TrainingInterrupted,
    caught_signals,
    changed_config,
    check_changes,
    check_data,
    check_new_run,
    checkpoint_due,
    data_identity,
    stop_now,
)
from ..train.optimizer import build_optimizer
from ..train.summary import eta
from .clip_bpe import train_clip_tokenizer
from .config import RESUMABLE, LitConfig
from .features import cache_features
from .step import PAD_MULTIPLE, LitStep
from .towers import build_lit, locked_weights, text_config, trained_weights

CHECKPOINT_FILES = ("lit.safetensors", "optimizer.safetensors")
TOKENIZER = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
LOSS_LABELS = {"loss": "contrastive loss (CLIP softmax, mean of both directions)"}


def lit_tune(
    data,
    out,
    config: LitConfig | None = None,
    tokenizer: str | os.PathLike | None = None,
    resume: bool = False,
    until: int | None = None,
    distributed: bool = False,
    echo=print,
    allow_data_change: bool = False,
    changes: dict | None = None,
) -> dict:
    """LiT-tune (or resume) the run in `out` on `data` (a captioned folder, list or tars, or a
    `CaptionedImages`); returns the last step's log record ({} on ranks other than 0).

    `config.encoder` names the locked encoder; `tokenizer` is a folder with CLIP BPE files
    (`tokenizer.json`, or `vocab.json` + `merges.txt`), any Hugging Face `tokenizer.json` (a file
    or its folder; see `text_tokenizer`), or None to learn a CLIP BPE of
    `config.text.vocab_size` tokens on the captions. `until` stops early (after a checkpoint)
    without changing the schedule; `changes` (with `resume`) sets new `RESUMABLE` values.
    """
    out = Path(out).expanduser()
    group = mx.distributed.init() if distributed else None
    rank = group.rank() if group is not None else 0
    check_changes(changes, resume, RESUMABLE)
    if resume and not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out}: no run to resume (no config.json)")
    if not resume and config is None:
        raise SettingError("a new run needs a config")
    if rank == 0 and not resume:
        check_new_run(out)
    with locked(out) if rank == 0 else contextlib.nullcontext():
        return _Run(data, out, group, echo).go(
            config, tokenizer, resume, until, allow_data_change, changes or {}
        )


def read_config(run: Path) -> LitConfig:
    """A LiT run's config.json (ValueError naming the file when it is not one)."""
    try:
        return LitConfig.from_dict(json.loads((run / "config.json").read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UnusableFileError(f"{run / 'config.json'}: not a LiT run config ({exc})") from None


def check_encoder(config: LitConfig, encoder) -> None:
    """The encoder loaded for a run must be the one it locked (name and weights fingerprint)."""
    found, recorded = model_identity(encoder), config.encoder_identity
    if not same_model(found, recorded):
        raise SettingError(
            f"{config.encoder}: not the encoder this run locked ({recorded.get('name')}, weights "
            f"{recorded.get('weights_sha256')}; found {found['name']}, {found['weights_sha256']})"
        )


def pair_indices(
    seed: int, n: int, step: int, batch: int, world: int = 1, rank: int = 0
) -> np.ndarray:
    """The samples rank `rank` trains on at `step`: positions [s·G + r·B, s·G + (r+1)·B) of the
    data order, G = B·W, where position p is sample perm_e[p mod n] of epoch e = p div n and
    perm_e is drawn from (seed, e) — so one process with batch W·B sees what W ranks see."""
    start = step * batch * world + rank * batch
    positions = np.arange(start, start + batch)
    out = np.empty(batch, np.int64)
    for epoch in np.unique(positions // n):
        chosen = positions // n == epoch
        out[chosen] = np.random.default_rng([seed, int(epoch)]).permutation(n)[
            positions[chosen] % n
        ]
    return out


class _Run:
    """One call of `lit_tune`, inside the folder's lock."""

    def __init__(self, data, out: Path, group, echo):
        self.source = load_captioned(data) if isinstance(data, (str, os.PathLike)) else data
        self.out, self.group, self.echo = out, group, echo
        self.rank, self.world = ranks.rank_and_size(group) if group is not None else (0, 1)

    def go(
        self, config, tokenizer, resume: bool, until, allow_data_change: bool, changes: dict
    ) -> dict:
        out, rank = self.out, self.rank
        recorded = read_config(out) if resume else None
        config = dataclasses.replace(recorded, **changes) if resume else dataclasses.replace(config)
        encoder = load(config.encoder)
        if resume:
            check_encoder(recorded, encoder)
            text = recorded.text
            tok = text_tokenizer(
                out / TOKENIZER, text.max_position_embeddings, text.eos_token_id, text.pad_token_id
            )
        else:
            config.check()
            tok = self._new_run(config, tokenizer, encoder)
        identity = data_identity(self.source)
        if resume:
            check_data(out, identity, allow_data_change, self.echo)
        if rank == 0:
            with naming_full_disk(out / "data.json"):
                (out / "data.json").write_text(json.dumps(identity, indent=2) + "\n")
        features = cache_features(
            self.source, out, encoder, config.feature_dtype, config.feature_batch_size
        )
        if features.failed and rank == 0:
            self.echo(
                f"{features.failed} images could not be decoded and are left out "
                f"(listed in {out / 'features' / 'failures.jsonl'})"
            )
        global_batch = config.batch_size * self.world
        if len(features.captions) < global_batch:
            raise SettingError(
                f"{self.source.origin}: {len(features.captions)} usable pairs, fewer than one "
                f"contrastive batch of {global_batch}; lower --batch-size"
            )
        model = build_lit(config, locked_weights(encoder), encoder.config.preprocess)
        del encoder
        optimizer = build_optimizer(config)
        optimizer.init(model.trainable_parameters())
        start = self._resume(model, optimizer) if resume else 0
        if resume:
            config = changed_config(recorded, changes, start, self.echo)
            if rank == 0 and config != recorded:
                with naming_full_disk(out / "config.json"):
                    config.save(out / "config.json")
            if rank == 0:
                logs.truncate(out / "log.jsonl", start)
        end = config.steps if until is None else min(until, config.steps)
        if rank == 0 and start < end:
            self.echo(self._summary(config, model, len(features.captions), start))
        if rank == 0 and resume and start >= config.steps:
            self.echo(
                f"{out}: the run is complete ({start} of {config.steps} steps); "
                "pass --steps N to extend it"
            )
        input_ids = tok.encode(features.captions)
        return self._train(
            config, model, optimizer, features, input_ids, tok.eos_id, start, end, identity
        )

    def _new_run(self, config: LitConfig, tokenizer, encoder) -> CaptionTokenizer:
        """Fill in what the encoder and tokenizer decide, and write config.json and tokenizer/."""
        out = self.out
        if config.encoder != "bundled" and Path(config.encoder).expanduser().exists():
            # so export finds it from anywhere
            config.encoder = str(Path(config.encoder).expanduser().resolve())
        config.encoder_identity = model_identity(encoder)
        config.vision = encoder.config.vision
        if self.rank == 0:
            check_new_run(out)
            given = None
            if tokenizer is not None:  # read before the run folder is made: refused, it stays out
                tokenizer = Path(tokenizer).expanduser()
                given = text_tokenizer(tokenizer, config.text.max_position_embeddings)
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            with naming_full_disk(out / TOKENIZER):
                if given is not None:
                    _copy_tokenizer(tokenizer, given, out / TOKENIZER)
                else:
                    train_clip_tokenizer(
                        self.source.captions(), out / TOKENIZER, config.text.vocab_size
                    )
        ranks.barrier(self.group)
        tok = text_tokenizer(out / TOKENIZER, config.text.max_position_embeddings)
        config.text = text_config(config, tok)
        if self.rank == 0:
            with naming_full_disk(out / "config.json"):
                config.save(out / "config.json")
        return tok

    def _resume(self, model, optimizer) -> int:
        checkpoint, note = resume_point(self.out, CHECKPOINT_FILES)
        if note:
            self.echo(note)
        if checkpoint is None:
            return 0
        try:
            model.load_weights(str(checkpoint / "lit.safetensors"), strict=False)
            optimizer.state = tree_unflatten(
                list(mx.load(str(checkpoint / "optimizer.safetensors")).items())
            )
            mx.eval(model.parameters(), optimizer.state)
        except (ValueError, RuntimeError) as exc:
            raise UnusableFileError(
                f"{checkpoint}: does not fit this run's model ({exc})"
            ) from None
        step = json.loads((checkpoint / "state.json").read_text())["step"]
        self.echo(f"resumed {checkpoint} at step {step}")
        return step

    def _train(
        self,
        config: LitConfig,
        model,
        optimizer,
        features,
        input_ids,
        end_id: int,
        start: int,
        end: int,
        identity: dict,
    ) -> dict:
        out, rank, world = self.out, self.rank, self.world
        step_fn = LitStep(model, optimizer, config, self.group if world > 1 else None)
        all_sum = (lambda x: mx.distributed.all_sum(x, group=self.group)) if world > 1 else None
        n, global_batch = len(features.captions), config.batch_size * world
        record: dict = {}
        loop_started = last_save = time.perf_counter()
        saved = None
        with caught_signals() as caught:
            for step in range(start, end):
                began = time.perf_counter()
                rows = pair_indices(config.seed, n, step, config.batch_size, world, rank)
                stats = step_fn(
                    features.tokens[rows], trim_padding(input_ids[rows], end_id, PAD_MULTIPLE)
                )
                done = step + 1
                record = {
                    "step": done,
                    **stats,
                    "lr": float(optimizer.learning_rate.item()),
                    "pairs_per_s": global_batch / (time.perf_counter() - began),
                    "samples_seen": done * global_batch,
                }
                stop = stop_now(caught, all_sum)
                if rank == 0:
                    if done % config.log_every == 0 or done == end:
                        logs.append(out / "log.jsonl", record)
                        self.echo(
                            f"step {done}/{config.steps} loss {record['loss']:.4f} scale "
                            f"{record['logit_scale']:.1f} lr {record['lr']:.2e} "
                            f"{record['pairs_per_s']:.0f} pairs/s, eta "
                            f"{eta(time.perf_counter() - loop_started, done - start, end - done)}"
                        )
                    if checkpoint_due(config, done, end, stop, last_save):
                        saved = save_lit_checkpoint(
                            out,
                            done,
                            model,
                            optimizer,
                            {
                                "samples_seen": done * global_batch,
                                "seed": config.seed,
                                "config": config.to_dict(),
                                "data": identity,
                            },
                        )
                        last_save = time.perf_counter()
                if stop and done < end:
                    raise TrainingInterrupted(done, caught[0] if caught else signal.SIGINT, saved)
        if rank != 0:
            return {}
        with naming_full_disk(out / "loss.png"):
            logs.plot_losses(out / "log.jsonl", out / "loss.png", "LiT-tuning", LOSS_LABELS)
        return record

    def _summary(self, config: LitConfig, model, pairs: int, start: int) -> str:
        trained = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        batch = config.batch_size * self.world
        text = config.text
        return "\n".join(
            [
                f"encoder (locked): {config.encoder_identity.get('name')} from {config.encoder}; "
                f"text tower {text.hidden_size} wide, {text.num_hidden_layers} blocks, vocabulary "
                f"{text.vocab_size}: {trained:,} trained of {parameter_count(model):,} parameters",
                f"data: {pairs:,} pairs; {config.steps} steps"
                + (f" (resuming at step {start})" if start else "")
                + f" of batch {batch}, ~{config.steps * batch / pairs:.1f} epochs; "
                f"lr {config.peak_lr:g}, warmup {config.warmup_steps} steps; CLIP softmax loss",
                f"outputs in {self.out}/: log.jsonl every {config.log_every} steps, loss.png, "
                f"checkpoints/ every {config.checkpoint_every} steps, at the end and on Ctrl-C; "
                f"`aimv2 export {self.out} OUT` writes the LiT model",
            ]
        )


def save_lit_checkpoint(run: Path, step: int, model, optimizer, state: dict, keep: int = 3) -> Path:
    def write(tmp: Path, final: Path) -> None:
        for name, tree in (
            ("lit.safetensors", trained_weights(model)),
            ("optimizer.safetensors", dict(tree_flatten(optimizer.state))),
        ):
            with naming_full_disk(final / name):
                mx.save_safetensors(str(tmp / name), tree)

    return write_checkpoint(run, step, write, CHECKPOINT_FILES, state, keep)


def _copy_tokenizer(source: Path, tok: CaptionTokenizer, folder: Path) -> None:
    """A given tokenizer (`tok`, read from `source`) into the run: CLIP BPE files as they are;
    any other `tokenizer.json` saved so that it states the EOS and pad ids the run uses, with a
    `tokenizer_config.json` naming them (what transformers' `AutoTokenizer` reads back)."""
    folder.mkdir(parents=True, exist_ok=True)
    if tok.bos_id is not None and source.is_file():  # CLIP's (the one with a start token)
        shutil.copyfile(source, folder / "tokenizer.json")
        return
    if tok.bos_id is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
        return
    tok.save(folder / "tokenizer.json")
    names = {
        name: tok.tokenizer.id_to_token(i)
        for name, i in (("eos_token", tok.eos_id), ("pad_token", tok.pad_id))
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": tok.context_length,
    }
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
