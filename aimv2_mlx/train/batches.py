"""Which images, crops and prefix lengths each optimizer step sees — stateless in (seed, step).

Step s covers global positions [s·G, (s+1)·G) of the data order, G = micro-batch × accumulation
× ranks; position p is sample perm_e[p mod n] of epoch e = p div n, perm_e a permutation drawn
from (seed, e). A sample's crop and flip come from (seed, e, sample) and the step's prefix
lengths from (seed, s). So resuming at step s needs only s, and one process with batch 2B sees
exactly what two ranks with batch B see together (micro-batch k of a step is the global slice
[k·B·W, (k+1)·B·W); rank r takes its r-th block of B).

An unreadable sample is replaced by another drawn from (seed, epoch, sample, attempt), so the
batch keeps its shape and a resumed run replaces it the same way; `strict` stops instead.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..data.augment import augment, normalize
from ..images import ImageError
from ..objective import pixel_count, sample_prefix_lengths, text_count


@dataclass
class MicroBatch:
    pixels: np.ndarray  # (B, H, W, 3) float32
    input_ids: np.ndarray  # (B, T) int32
    prefix_lengths: np.ndarray  # (B,) int32
    indices: np.ndarray  # sample indices, for the record


@dataclass
class StepBatch:
    micro: list[MicroBatch]
    # counted target patches of this rank's micro-batches (summed over ranks by the caller)
    pixel_count: int
    text_count: int  # counted caption tokens of this rank's micro-batches (likewise)
    # samples replaced because they were unreadable
    failures: list[dict] = field(default_factory=list)


SUBSTITUTES = 16  # replacement draws for one unreadable sample before the run stops


class BatchPlan:
    def __init__(
        self,
        source,
        tokenizer,
        config,
        rank: int = 0,
        world: int = 1,
        workers: int = 2,
        strict: bool = False,
    ):
        self.source, self.tokenizer, self.config, self.strict = source, tokenizer, config, strict
        self.rank, self.world = rank, world
        self.num_patches = config.encoder.num_patches
        self._pool = ThreadPoolExecutor(max(1, workers))  # decodes the images of a micro-batch
        self._ahead = ThreadPoolExecutor(1)  # prepares the next step while this one trains
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.config.accumulation * self.world

    def samples_seen(self, step: int) -> int:
        return step * self.global_batch

    def _sample(self, position: int) -> tuple[int, int]:
        n = len(self.source)
        epoch = position // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.config.seed, epoch]).permutation(n)}
        return epoch, int(self._perms[epoch][position % n])

    def _load(self, epoch: int, index: int) -> tuple[np.ndarray, str, list[dict]]:
        cfg = self.config
        failures, chosen = [], index
        for attempt in range(SUBSTITUTES + 1):
            try:
                image, caption = self.source[chosen]
                break
            except (ImageError, OSError) as exc:
                if self.strict:
                    raise
                failures.append({"sample": self._name(chosen), "reason": str(exc)})
                chosen = int(
                    np.random.default_rng([cfg.seed, 3, epoch, index, attempt]).integers(
                        len(self.source)
                    )
                )
        else:
            raise ImageError(
                f"{failures[0]['reason']} (and the {SUBSTITUTES} samples drawn to replace it were "
                "unreadable too)"
            )
        rng = np.random.default_rng([cfg.seed, 1, epoch, index])
        image = augment(image, cfg.encoder.image_size, rng, cfg.crop_scale)
        return normalize(image, cfg.mean, cfg.std), caption, failures

    def _name(self, index: int) -> str:
        samples = getattr(self.source, "samples", None)
        return str(getattr(samples[index], "name", index)) if samples is not None else str(index)

    def step(self, step: int) -> StepBatch:
        cfg, B, W = self.config, self.config.batch_size, self.world
        start = step * self.global_batch
        prefixes = sample_prefix_lengths(
            np.random.default_rng([cfg.seed, 2, step]), self.global_batch, self.num_patches
        )
        micro, failures = [], []
        for k in range(cfg.accumulation):
            lo = k * B * W + self.rank * B
            where = [self._sample(start + lo + j) for j in range(B)]
            loaded = list(self._pool.map(lambda ei: self._load(*ei), where))
            ids = self.tokenizer.encode([caption for _, caption, _ in loaded])
            micro.append(
                MicroBatch(
                    np.stack([p for p, _, _ in loaded]),
                    ids,
                    prefixes[lo : lo + B],
                    np.array([i for _, i in where]),
                )
            )
            failures += [dict(f, step=step + 1) for _, _, found in loaded for f in found]
        return StepBatch(
            micro,
            sum(pixel_count(m.prefix_lengths, self.num_patches) for m in micro),
            sum(text_count(m.input_ids, self.tokenizer.ignore_ids) for m in micro),
            failures,
        )

    def prefetch(self, step: int):
        """A future for `step(step)`, prepared in the background while the current step runs."""
        return self._ahead.submit(self.step, step)
