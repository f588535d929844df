"""One optimizer step: gradients of micro-batches (compiled, fixed shapes), summed over
accumulation and ranks, then clipped (global norm) and applied by AdamW (compiled).

Each micro-batch's loss is its loss *sums* divided by the whole step's counts (all micro-batches,
all ranks), so summing gradients gives exactly the gradient of the step's patch- and
token-weighted means: accumulation and data parallelism change nothing but the arithmetic order.
With dtype bfloat16 the weights are cast for the forward/backward (master weights, RMSNorm
statistics — `mx.fast.rms_norm` accumulates in float32 — and the losses stay float32).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from .. import cpu
from ..objective import LossWeights, combine, loss_sums, used_weights


class PretrainModel(nn.Module):
    """The encoder and the decoder trained together; only the encoder is exported."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder


def gradients_and_update(model: nn.Module, optimizer: optim.Optimizer, loss, config):
    """(`mx.value_and_grad(loss)`, the global-norm-clipped optimizer update returning the pre-clip
    norm), each compiled when `config.compile`: the update over the model's and optimizer's state.
    Pre-training and LiT-tuning share it."""
    grads = mx.value_and_grad(loss)
    streams = cpu.model_streams(model)  # the CPU backend's: the update shared out over them

    def apply(gradients):
        return cpu.clipped_update(model, optimizer, gradients, config.grad_clip, streams)

    if not config.compile:
        return grads, apply
    state = [model.state, optimizer.state]
    return mx.compile(grads), partial(mx.compile, inputs=state, outputs=state)(apply)


class TrainStep:
    def __init__(
        self,
        model: PretrainModel,
        optimizer: optim.Optimizer,
        config,
        ignore_ids: tuple[int, ...],
        all_sum=None,
    ):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.all_sum = all_sum  # sums arrays over ranks (None: one process)
        weights = used_weights(
            config.objective, LossWeights(config.pixel_weight, config.text_weight)
        )
        compute = mx.bfloat16 if config.dtype == "bfloat16" else None

        def loss(params, pixels, input_ids, prefix, pixel_n, text_n):
            model.update(
                params if compute is None else tree_map(lambda p: p.astype(compute), params)
            )
            ps, ts = loss_sums(
                model.encoder,
                model.decoder,
                pixels.astype(compute or mx.float32),
                input_ids,
                prefix,
                config.objective,
                ignore_ids,
            )
            total, l_pixel, l_text = combine(ps, ts, pixel_n, text_n, weights)
            return total, l_pixel, l_text

        self._grads, self._apply = gradients_and_update(model, optimizer, loss, config)

    def __call__(self, batch) -> dict:
        """Train on one `StepBatch`; returns the step's losses and the pre-clip gradient norm."""
        counts = mx.array([batch.pixel_count, batch.text_count], dtype=mx.float32)
        if self.all_sum is not None:
            counts = self.all_sum(counts)
        pixel_n, text_n = counts[0], counts[1]
        params = self.model.trainable_parameters()
        total_grads, values = None, mx.zeros((3,), dtype=mx.float32)
        for micro in batch.micro:
            (total, l_pixel, l_text), grads = self._grads(
                params,
                mx.array(micro.pixels),
                mx.array(micro.input_ids),
                mx.array(micro.prefix_lengths),
                pixel_n,
                text_n,
            )
            self.model.update(params)  # the forward set (traced / cast) weights on the model
            total_grads = grads if total_grads is None else tree_map(mx.add, total_grads, grads)
            values = values + mx.stack([total, l_pixel, l_text]).astype(mx.float32)
            mx.eval(total_grads, values)
        if self.all_sum is not None:
            total_grads = tree_map(self.all_sum, total_grads)
            values = self.all_sum(values)
        norm = self._apply(total_grads)
        mx.eval(self.model.parameters(), self.optimizer.state, norm)
        loss, l_pixel, l_text = values.tolist()
        return {"loss": loss, "loss_pixel": l_pixel, "loss_text": l_text, "grad_norm": norm.item()}
