"""AdamW and the learning-rate schedule of the recipe (apple/ml-l3m,
configs/aimv2/001_aimv2_hfdata.yaml).

AdamW β = (0.9, 0.95), eps 1e-8, bias-corrected (MLX's default is not), decay applied as
p ← p·(1 − lr_t·wd) exactly as PyTorch's AdamW (MLX's semantics too; wd 0.1 at peak lr 1e-3 is
the recipe's 1e-4 fully decoupled decay). No decay on biases, norms, position tables and the
start vector. LR: linear warmup start_lr → peak_lr, then cosine to end_lr.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

# The LiT towers' tables (aimv2_mlx/lit.py) are named as in apple/ml-aim: `positional_embedding`,
# the attention-pool query `cls_token`.
NO_DECAY_NAMES = ("pos_embed", "text_pos_embed", "cls", "positional_embedding", "cls_token")


def decays(path: str, parameter: mx.array) -> bool:
    """Whether weight decay applies: matrices and the token embedding, not vectors or tables."""
    if parameter.ndim < 2:  # biases and norm weights
        return False
    return path.split(".")[-1] not in NO_DECAY_NAMES


def schedule(config):
    warmup = max(int(config.warmup_steps), 0)
    decay = optim.cosine_decay(config.peak_lr, max(config.steps - warmup, 1), config.end_lr)
    if warmup == 0:
        return decay
    ramp = optim.linear_schedule(config.start_lr, config.peak_lr, warmup)
    return optim.join_schedules([ramp, decay], [warmup])


def build_optimizer(config) -> optim.Optimizer:
    lr = schedule(config)

    def adamw(weight_decay: float):
        return optim.AdamW(
            lr,
            betas=list(config.betas),
            eps=config.eps,
            weight_decay=weight_decay,
            bias_correction=True,
        )

    return optim.MultiOptimizer([adamw(config.weight_decay), adamw(0.0)], [decays])
