"""The clipped optimizer update shared out over CPU streams equals MLX's clip + update."""

from __future__ import annotations

from functools import partial

import aimv2_mlx
from aimv2_mlx import cpu
from aimv2_mlx.cpu import update

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from .conftest import tiny_config


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(12, 32), nn.RMSNorm(32), nn.Linear(32, 5, bias=False))
    mx.eval(model.parameters())
    return model


def _optimizer() -> optim.Optimizer:
    def adamw(decay):
        return optim.AdamW(1e-2, betas=[0.9, 0.95], weight_decay=decay, bias_correction=True)

    return optim.MultiOptimizer([adamw(0.1), adamw(0.0)], [lambda path, p: p.ndim >= 2])


def _gradients(model: nn.Module, step: int, scale: float) -> dict:
    keys = iter(mx.random.split(mx.random.key(40 + step), 8))
    return tree_map(lambda p: mx.random.normal(p.shape, key=next(keys)) * scale, model.parameters())


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree) if isinstance(v, mx.array)}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("scale", [10.0, 1e-3])  # clipped / not clipped at max_norm 1
def test_the_update_over_two_streams_equals_clip_grad_norm_and_update(scale, compiled):
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    results = []
    for spread in ((), streams):
        mx.random.seed(0)
        model, optimizer = _model(), _optimizer()
        optimizer.init(model.trainable_parameters())

        def step(gradients, model=model, optimizer=optimizer, spread=spread):
            return update.clipped_update(model, optimizer, gradients, 1.0, spread)

        if compiled:
            state = [model.state, optimizer.state]
            step = partial(mx.compile, inputs=state, outputs=state)(step)
        norms = []
        for i in range(2):
            norms.append(step(_gradients(model, i, scale)).item())
            mx.eval(model.parameters(), optimizer.state)
        results.append((norms, _flat(model.parameters()), _flat(optimizer.state)))
    (norms, weights, state), (spread_norms, spread_weights, spread_state) = results
    assert np.allclose(spread_norms, norms, rtol=1e-6, atol=0)
    for expected, got in ((weights, spread_weights), (state, spread_state)):
        assert expected.keys() == got.keys()
        for name in expected:
            assert np.allclose(got[name], expected[name], rtol=1e-6, atol=1e-9), name


def test_the_plain_path_is_exactly_mlxs_clip_and_update():
    mx.random.seed(0)
    model, optimizer = _model(), _optimizer()
    gradients = _gradients(model, 0, 10.0)
    norm = update.clipped_update(model, optimizer, gradients, 1.0, ())
    mx.random.seed(0)
    reference, reference_optimizer = _model(), _optimizer()
    clipped, expected_norm = optim.clip_grad_norm(gradients, 1.0)
    reference_optimizer.update(reference, clipped)
    assert norm.item() == expected_norm.item()
    got, expected = _flat(model.parameters()), _flat(reference.parameters())
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_the_optimizer_keeps_its_own_update_rule_afterwards_even_after_an_error():
    model, optimizer = _model(), _optimizer()
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    gradients = _gradients(model, 0, 1.0)
    broken = dict(gradients, extra=mx.zeros((3,)))  # no such parameter: update raises
    with pytest.raises((KeyError, ValueError, IndexError)):
        update.clipped_update(model, optimizer, broken, 1.0, streams)
    assert all("apply_single" not in vars(leaf) for leaf in optimizer.optimizers)
    update.clipped_update(model, optimizer, gradients, 1.0, streams)
    assert all("apply_single" not in vars(leaf) for leaf in optimizer.optimizers)


@pytest.mark.parametrize(
    "sizes, count", [([10, 1, 1, 8], 2), ([5], 3), ([], 2), ([3, 3, 3, 3, 3], 2)]
)
def test_parameters_are_shared_out_by_size_with_loads_within_one_parameter(sizes, count):
    owners = update.balanced_owners(sizes, count)
    assert len(owners) == len(sizes) and all(0 <= o < count for o in owners)
    loads = [sum(s for s, o in zip(sizes, owners, strict=True) if o == k) for k in range(count)]
    assert max(loads) - min(loads) <= max(sizes, default=0)


def test_model_streams_are_the_cpu_backends_and_none_for_a_plain_model():
    model = aimv2_mlx.build(tiny_config())
    assert cpu.model_streams(model) == ()
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    cpu.apply(model, streams=streams)
    assert cpu.model_streams(model) == tuple(streams)
    cpu.remove(model)
    assert cpu.model_streams(model) == ()
