"""One optimizer step of LiT-tuning: the contrastive loss over the whole global batch, its
gradient (compiled, fixed shapes), clipped (global norm) and applied by AdamW.

Data parallel, exactly: each rank embeds its block of B pairs, the ranks exchange those
embeddings (`all_gather`), and each computes the full (W·B)² loss with only its own block
carrying gradients. The loss depends on each tower parameter only through the blocks, so the sum
of the ranks' gradients is the full gradient — except for the logit scale, which every rank
applies to the whole batch and which therefore collects W times its gradient; it is divided back.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..train.step import gradients_and_update
from .loss import clip_loss

PAD_MULTIPLE = 8  # trimmed caption batches are a multiple of this long: few compiled shapes


class LitStep:
    def __init__(self, model, optimizer: optim.Optimizer, config, group=None):
        self.model, self.optimizer, self.group = model, optimizer, group
        self.world = group.size() if group is not None else 1
        rank = group.rank() if group is not None else 0

        def loss(params, tokens, input_ids, *others):
            model.update(params)
            image = model.encode_image_tokens(tokens.astype(mx.float32))
            text = model.encode_text(input_ids)
            if others:  # this rank's block, spliced into everyone's embeddings
                others_image, others_text = others
                B = image.shape[0]
                image = mx.concatenate(
                    [others_image[: rank * B], image, others_image[(rank + 1) * B :]]
                )
                text = mx.concatenate(
                    [others_text[: rank * B], text, others_text[(rank + 1) * B :]]
                )
            return clip_loss(image, text, model.logit_scale())

        self._grads, self._apply = gradients_and_update(model, optimizer, loss, config)

    def _gathered(self, tokens: mx.array, input_ids: mx.array) -> tuple[mx.array, ...]:
        """Every rank's embeddings of its block, gathered (no gradient); () on one process."""
        if self.world == 1:
            return ()
        image = self.model.encode_image_tokens(tokens.astype(mx.float32))
        text = self.model.encode_text(input_ids)
        both = mx.distributed.all_gather(mx.concatenate([image, text], axis=1), group=self.group)
        return both[:, : image.shape[1]], both[:, image.shape[1] :]

    def __call__(self, tokens, input_ids) -> dict:
        """Train on this rank's block (tokens (B, N, D), ids (B, T)); returns the loss, the pre-clip
        gradient norm and the logit scale."""
        tokens, input_ids = mx.array(tokens), mx.array(input_ids)
        params = self.model.trainable_parameters()
        others = self._gathered(tokens, input_ids)
        value, grads = self._grads(params, tokens, input_ids, *others)
        self.model.update(params)  # the traced forward left its arrays on the model
        if self.world > 1:
            grads = tree_map(lambda g: mx.distributed.all_sum(g, group=self.group), grads)
            grads["log_logit_scale"] = grads["log_logit_scale"] / self.world
        norm = self._apply(grads)
        mx.eval(self.model.parameters(), self.optimizer.state, norm, value)
        return {
            "loss": value.item(),
            "grad_norm": norm.item(),
            "logit_scale": self.model.logit_scale().item(),
        }
