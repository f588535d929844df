"""Attentive probe: AIM's attention-pooling head trained on frozen patch tokens.

The head is apple/ml-aim's attention-pooling head, the one the LiT model uses: a learned query
attends over the tokens through bias-free key/value projections, then a linear layer maps to the
classes. Training follows the attentive-probe protocol of the AIMv2 paper (arXiv 2411.14402):
AdamW, linear warmup then cosine decay, gradient clipping at 3.0; a small learning-rate ×
weight-decay sweep picks the head with the best validation accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .. import cpu
from ..encoder import AttentionPoolHead
from ..vectors import softmax

DEFAULT_SWEEP = ((1e-3, 0.05), (3e-4, 0.05), (1e-3, 0.2))  # (peak learning rate, weight decay)
GRAD_CLIP = 3.0


@dataclass
class AttentiveSettings:
    epochs: int = 30
    batch_size: int = 256
    warmup_fraction: float = 0.1
    num_heads: int | None = None  # default: the encoder's heads
    seed: int = 0


def new_head(dims: int, num_classes: int, num_heads: int, seed: int) -> AttentionPoolHead:
    mx.random.seed(seed)
    head = AttentionPoolHead(dims, num_heads, out_dims=num_classes)
    head.cls_token = mx.random.normal(head.cls_token.shape) * 0.02
    mx.eval(head.parameters())
    return cpu.apply(head, streams=(), training=True) if cpu.on_cpu() else head


def train_attentive_head(
    tokens: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    lr: float,
    weight_decay: float,
    settings: AttentiveSettings,
    on_epoch=None,
) -> AttentionPoolHead:
    """One head trained on (N, T, D) tokens with AdamW + warmup/cosine + clipping; `on_epoch()`
    after each epoch."""
    n, _, dims = tokens.shape
    head = new_head(dims, num_classes, settings.num_heads or max(1, dims // 64), settings.seed)
    steps_per_epoch = max(1, math.ceil(n / settings.batch_size))
    total = settings.epochs * steps_per_epoch
    warmup = max(1, int(settings.warmup_fraction * total))
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(lr * 1e-3, lr, warmup),
            optim.cosine_decay(lr, max(1, total - warmup), lr * 1e-3),
        ],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    grad_fn = nn.value_and_grad(head, loss_fn)

    def step(x, y):
        loss, grads = grad_fn(head, x, y)
        grads, _ = optim.clip_grad_norm(grads, GRAD_CLIP)
        optimizer.update(head, grads)
        return loss

    rng = np.random.default_rng(settings.seed)
    for _ in range(settings.epochs):
        order = rng.permutation(n)
        for start in range(0, n, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            step(mx.array(tokens[batch]), mx.array(labels[batch].astype(np.int32)))
            mx.eval(head.parameters(), optimizer.state)
        if on_epoch:
            on_epoch()
    return head


def head_scores(head: AttentionPoolHead, tokens: np.ndarray, batch_size: int = 512) -> np.ndarray:
    return (
        np.concatenate(
            [
                np.array(head(mx.array(tokens[i : i + batch_size])))
                for i in range(0, len(tokens), batch_size)
            ]
        )
        if len(tokens)
        else np.zeros((0, 0))
    )


def train_attentive(
    train,
    val,
    num_classes: int,
    settings: AttentiveSettings | None = None,
    sweep=DEFAULT_SWEEP,
    progress=None,
) -> tuple[AttentionPoolHead, dict]:
    """Sweep (lr, weight decay) on validation; keep the best head. `progress(done, total)` counts
    epochs over the whole sweep."""
    settings = settings or AttentiveSettings()
    results, best, epochs = {}, None, [0]
    total = len(sweep) * settings.epochs

    def on_epoch() -> None:
        epochs[0] += 1
        progress(epochs[0], total)

    for lr, wd in sweep:
        head = train_attentive_head(
            *train, num_classes, lr, wd, settings, on_epoch if progress else None
        )
        accuracy = float((head_scores(head, val[0]).argmax(1) == val[1]).mean())
        results[f"lr={lr:g},wd={wd:g}"] = accuracy
        if best is None or accuracy > best[0]:
            best = (accuracy, head, lr, wd)
    _, head, lr, wd = best
    return head, {
        "lr": lr,
        "weight_decay": wd,
        "val_accuracy_by_setting": results,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "num_heads": head.num_heads,
    }


def head_arrays(head: AttentionPoolHead) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(head.parameters())}


def head_from_arrays(arrays: dict[str, np.ndarray], num_heads: int) -> AttentionPoolHead:
    dims = arrays["k.weight"].shape[1]
    head = AttentionPoolHead(dims, num_heads, out_dims=arrays["linear.weight"].shape[0])
    head.load_weights([(k, mx.array(v)) for k, v in arrays.items()])
    return head


@dataclass
class AttentiveHead:
    """The probe-head interface around a trained `AttentionPoolHead`."""

    module: AttentionPoolHead
    name: ClassVar[str] = "attentive"
    pooled: ClassVar[bool] = False

    def probabilities(self, tokens: np.ndarray) -> np.ndarray:
        return softmax(head_scores(self.module, tokens))

    @classmethod
    def fit(
        cls, train, val, num_classes: int, settings, progress=None
    ) -> tuple[AttentiveHead, dict]:
        module, chosen = train_attentive(
            train, val, num_classes, settings.attentive, progress=progress
        )
        return cls(module), chosen

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        return head_arrays(self.module), {"num_heads": self.module.num_heads}

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], settings: dict, num_classes: int
    ) -> AttentiveHead:
        return cls(head_from_arrays(arrays, settings["num_heads"]))
