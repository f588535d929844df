"""Which part of a run this process does, when started by `mlx.launch` (one process otherwise)."""

from __future__ import annotations

import mlx.core as mx


def group():
    """The MLX distributed group (size 1 when not launched with `mlx.launch`)."""
    return mx.distributed.init() if mx.distributed.is_available() else None


def rank_and_size(world=None) -> tuple[int, int]:
    world = world if world is not None else group()
    return (world.rank(), world.size()) if world is not None else (0, 1)


def barrier(world) -> None:
    """Wait until every process gets here (a tiny all-reduce)."""
    if world is not None and world.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1), group=world, stream=mx.cpu))


def my_range(count: int, rank: int, size: int) -> range:
    """The contiguous block of `count` ordered things that `rank` of `size` handles."""
    return range(rank * count // size, (rank + 1) * count // size)
