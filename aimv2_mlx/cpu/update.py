"""The clipped optimizer update with its parameters shared out over the CPU streams.

MLX runs each stream's element-wise work on one thread, so `optim.clip_grad_norm` followed by
`optimizer.update` runs on one core while the others wait: at the base preset 0.38 s of a
training step, memory-bound (AdamW reads a parameter, its gradient and two moments and writes
three of them back). Here each stream takes a share of the parameters, balanced by size: it
sums its gradients' squares for the global norm and, once the norm is known, scales and updates
its own parameters with the optimizer's own per-parameter rule (`apply_single`). The numbers
are those of `clip_grad_norm` + `update`; only the order of the norm's sum differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from .modules import CPUTransformer


def balanced_owners(sizes: Sequence[int], count: int) -> list[int]:
    """For each size, the share (0 .. count-1) it goes to: largest first, to the lightest share."""
    loads = [0] * count
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        share = loads.index(min(loads))
        owners[index] = share
        loads[share] += sizes[index]
    return owners


def _leaf_optimizers(optimizer: optim.Optimizer) -> list[optim.Optimizer]:
    return list(getattr(optimizer, "optimizers", [optimizer]))


@contextmanager
def _leaves_on_streams(optimizer: optim.Optimizer, stream_of: dict, normalizer: mx.array):
    """While open, each parameter's update runs on `stream_of[id(its gradient)]`, with the
    gradient scaled by `normalizer` as `clip_grad_norm` scales it."""

    def on_its_stream(apply_single):
        def single(gradient, parameter, state):
            with mx.stream(stream_of[id(gradient)]):
                clipped = (gradient * normalizer).astype(gradient.dtype)
                return apply_single(clipped, parameter, state)

        return single

    leaves = _leaf_optimizers(optimizer)
    saved = [vars(leaf).get("apply_single") for leaf in leaves]  # None: the class's method
    for leaf in leaves:
        leaf.apply_single = on_its_stream(leaf.apply_single)
    try:
        yield
    finally:
        for leaf, own in zip(leaves, saved, strict=True):
            if own is None:
                del leaf.apply_single
            else:
                leaf.apply_single = own


def clipped_update(
    model: nn.Module,
    optimizer: optim.Optimizer,
    gradients: dict,
    max_norm: float,
    streams: Sequence,
) -> mx.array:
    """`optim.clip_grad_norm(gradients, max_norm)` then `optimizer.update(model, ...)`, spread
    over `streams` (fewer than two: exactly those two calls). Returns the pre-clip norm."""
    if len(streams) < 2:
        clipped, norm = optim.clip_grad_norm(gradients, max_norm)
        optimizer.update(model, clipped)
        return norm
    leaves = [g for _, g in tree_flatten(gradients)]
    owners = balanced_owners([g.size for g in leaves], len(streams))
    squares = []
    for share, stream in enumerate(streams):
        with mx.stream(stream):
            mine = [g for g, owner in zip(leaves, owners, strict=True) if owner == share]
            squares.append(sum((_squared_norm(g) for g in mine), mx.array(0.0)))
    norm = mx.sqrt(sum(squares))
    normalizer = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    stream_of = {id(g): streams[owner] for g, owner in zip(leaves, owners, strict=True)}
    with _leaves_on_streams(optimizer, stream_of, normalizer):
        optimizer.update(model, gradients)
    return norm


def _squared_norm(gradient: mx.array) -> mx.array:
    # float16 squares summed in float32, as clip_grad_norm does, so they do not overflow
    if gradient.dtype == mx.float16:
        gradient = gradient.astype(mx.float32)
    return gradient.square().sum()


def model_streams(model: nn.Module) -> tuple:
    """The streams the CPU backend split `model`'s trunks over (() when it is not applied)."""
    for _, module in model.named_modules():
        if isinstance(module, CPUTransformer) and module.streams:
            return module.streams
    return ()
