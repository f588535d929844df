"""The CPU versions of the transformer pieces, and `apply`, which swaps them into a model.

`apply(model)` works like `nn.quantize`: it walks the model and retypes every `Attention`, `SwiGLU`,
`Block`, `Transformer`, `AttentionPoolHead` and `MultimodalDecoder` (its text loss) to the
subclass below, in place, and every `nn.Linear` (for training, with its weight gradient in the
weight's own row order: `kernels.linear`). Weights, parameter names and saved files are
untouched; `remove(model)` turns them back. In float32 the subclasses use the vectorised kernels
of `cpu.kernels` (forward and backward); for other dtypes they defer to the plain classes.

The trunk also splits its rows over one MLX stream per core (`settings.tune`): whole images per
stream when the batch divides evenly, else blocks of tokens per stream, which meet at each
attention to share keys and values. A linear layer outside a trunk (a decoder's projector and
heads) splits its rows the same way: the BLAS runs one thread per stream, so a matmul left on
one stream would get one core. Results equal the plain forward to float32 rounding (BLAS may sum
differently for different row counts).

Each stream reads the weights through its own handle (`weight_handles`), made on the stream that
called the layer. A weight's gradient is then summed from its per-stream parts on that calling
stream, not on one of the row streams: MLX runs each stream's work in order, and a row stream
that had to add the other's part would wait for it, taking turns with it instead of running
beside it (`bench/train_threads.py`, small preset: both cores busy in 42% of 50 ms windows
before, 66% after; 3.31 -> 2.91 s per step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..decoder import MultimodalDecoder
from ..encoder import AttentionPoolHead
from ..layers import Attention, Block, Mask, SwiGLU, Transformer, block_indices
from . import kernels, settings

MIN_SPLIT_ROWS = 64  # below this many tokens (batch x sequence) a trunk runs on one stream


def additive(mask: Mask, n: int, dtype) -> mx.array | None:
    """A mask as the kernels take it: None, or an additive array (0 = may attend, -inf = not)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        idx = mx.arange(n)
        mask = idx[None, :] <= idx[:, None]
    if mask.dtype == mx.bool_:
        return mx.where(mask, mx.array(0.0, dtype), mx.array(-math.inf, dtype))
    return mask.astype(dtype)


class CPUAttention(Attention):
    def __call__(self, x: mx.array, mask: Mask = None) -> mx.array:
        if x.dtype != mx.float32:
            return super().__call__(x, mask)
        return self.proj(self.attend(self.qkv(x), additive(mask, x.shape[1], x.dtype)))

    def attend(self, qkv: mx.array, mask: mx.array | None, kv: mx.array | None = None) -> mx.array:
        """Between the projections: (B, n, 3D) -> (B, n, D); `kv`: the whole sequence's
        projections when `qkv` holds only a block of its rows."""
        return kernels.qkv_attention(qkv, self.num_heads, self.scale, mask, kv)


class CPUSwiGLU(SwiGLU):
    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != mx.float32:
            return super().__call__(x)
        return self.fc2(kernels.silu_mul(self.fc1(x), self.fc3(x)))


class CPUAttentionPoolHead(AttentionPoolHead):
    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        if q.dtype != mx.float32:
            return super().attend(q, k, v, scale)
        return kernels.attention(q, k, v, scale, None)


@mx.custom_function
def _handle(weight: mx.array) -> mx.array:
    return mx.contiguous(weight)  # shares the buffer; unlike a no-op, compile keeps it


@_handle.vjp
def _handle_vjp(primals, cotangent, output):
    return kernels.single(cotangent)


def weight_handles(module: nn.Module, count: int) -> list[dict]:
    """`count` handles on `module`'s weights: the same buffers, separate nodes of the graph
    (custom functions are never merged), each collecting one stream's share of the gradient."""
    weights = module.parameters()
    return [tree_map(_handle, weights) for _ in range(count)]


@contextmanager
def reading(module: nn.Module, weights: dict) -> Iterator[None]:
    """`module` with `weights` (a tree of its parameters' shape) for the duration of a block."""
    saved = module.parameters()
    module.update(weights)
    try:
        yield
    finally:
        module.update(saved)


def over_parts(module: nn.Module, streams: Sequence, parts: list, call, handles=None) -> list:
    """`call(*part)` for each part (a tuple of arguments) on its own stream, `module` reading its
    weights through that stream's handle (`handles`, made here unless given)."""
    if handles is None:
        handles = weight_handles(module, len(streams))
    outs = []
    for stream, part, weights in zip(streams, parts, handles, strict=True):
        with reading(module, weights), mx.stream(stream):
            outs.append(call(*part))
    return outs


def over_streams(module: nn.Module, x: mx.array, axis: int, call) -> mx.array:
    """`call` over blocks of `x` along `axis`, one per stream of `module`, joined again."""
    parts = [(part,) for part in _parts(x, axis, len(module.streams))]
    return mx.concatenate(over_parts(module, module.streams, parts, call), axis=axis)


class CPULinear(nn.Linear):
    streams: tuple = ()  # set by `apply` for layers outside a trunk
    # set by `apply(..., training=True)`: the row-order weight gradient of `kernels.linear`
    # (the custom function costs inference ~3% at AIMv2-L, so a model only run forward skips it)
    row_order_gradient: bool = False

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != mx.float32:
            return super().__call__(x)
        axis = split_plan(x, self.streams) if x.ndim == 3 else None
        if axis is None:
            return self.project(x)
        return over_streams(self, x, axis, self.project)

    def project(self, x: mx.array) -> mx.array:
        if not self.row_order_gradient:
            return super().__call__(x)
        return kernels.linear(x, self["weight"], self.get("bias"))


class CPUMultimodalDecoder(MultimodalDecoder):
    def token_losses(self, logits: mx.array, targets: mx.array) -> mx.array:
        if logits.dtype != mx.float32:
            return super().token_losses(logits, targets)
        return kernels.cross_entropy(logits, targets)


class CPUBlock(Block):
    def over_row_blocks(self, parts: list, masks: list, streams: list) -> list:
        """This block over row blocks of one sequence, each on its own stream; every block's
        queries see the keys and values of all rows."""
        handles = weight_handles(self, len(streams))
        qkvs = over_parts(
            self, streams, [(x,) for x in parts], lambda x: self.attn.qkv(self.norm_1(x)), handles
        )

        def rest(x, qkv, mask):
            x = x + self.attn.proj(self.attn.attend(qkv, mask, mx.concatenate(qkvs, axis=1)))
            return x + self.mlp(self.norm_2(x))

        return over_parts(self, streams, list(zip(parts, qkvs, masks, strict=True)), rest, handles)

    def over_images(self, parts: list, masks: list, streams: list) -> list:
        """This block over whole images, each part on its own stream."""
        return over_parts(self, streams, list(zip(parts, masks, strict=True)), self)


class CPUTransformer(Transformer):
    streams: tuple = ()  # set per trunk by `apply` (an attribute, not a child: no parameters)

    def __call__(
        self, x: mx.array, mask: Mask = None, feature_blocks: tuple[int, ...] = ()
    ) -> tuple[mx.array, list[mx.array]]:
        if x.dtype != mx.float32:
            return super().__call__(x, mask, feature_blocks)
        mask = additive(mask, x.shape[1], x.dtype)
        plan = split_plan(x, self.streams)
        if plan is None:
            return super().__call__(x, mask, feature_blocks)
        axis = plan
        bounds = _bounds(x.shape[axis], len(self.streams))
        parts = _parts(x, axis, len(self.streams))
        masks = [_mask_part(mask, axis, x.shape[0], a, b) for a, b in bounds]
        wanted = block_indices(feature_blocks, len(self.blocks))
        outputs = {}
        for i, block in enumerate(self.blocks):
            if axis == 0:
                parts = block.over_images(parts, masks, self.streams)
            else:
                parts = block.over_row_blocks(parts, masks, self.streams)
            if i in wanted:
                outputs[i] = mx.concatenate(parts, axis=axis)
        norm = self.post_trunk_norm
        normed = over_parts(norm, self.streams, [(part,) for part in parts], norm)
        return mx.concatenate(normed, axis=axis), [outputs[i] for i in wanted]


def split_plan(x: mx.array, streams: list) -> int | None:
    """The axis to split a (B, N, D) trunk input over `streams`, or None to run it whole.

    Whole images per stream when the batch divides evenly (axis 0, no cross-stream traffic),
    else blocks of tokens (axis 1); None when too small to pay.
    """
    B, N = x.shape[0], x.shape[1]
    if len(streams) < 2 or B * N < MIN_SPLIT_ROWS:
        return None
    if B % len(streams) == 0:
        return 0
    return 1 if len(streams) <= N else None


def _bounds(length: int, count: int) -> list[tuple[int, int]]:
    return [(length * j // count, length * (j + 1) // count) for j in range(count)]


def _parts(x: mx.array, axis: int, count: int) -> list[mx.array]:
    """`x` cut into `count` near-equal blocks along `axis` (0 or 1)."""
    return [x[a:b] if axis == 0 else x[:, a:b] for a, b in _bounds(x.shape[axis], count)]


def _mask_part(mask: mx.array | None, axis: int, batch: int, a: int, b: int) -> mx.array | None:
    """The rows of an additive mask (broadcastable to (B, H, N, N)) that one part needs."""
    if mask is None:
        return None
    if axis == 0:
        return mask[a:b] if mask.ndim == 4 and mask.shape[0] == batch > 1 else mask
    return mask[..., a:b, :] if mask.shape[-2] > 1 else mask


SWAPS = {
    nn.Linear: CPULinear,
    Attention: CPUAttention,
    SwiGLU: CPUSwiGLU,
    Block: CPUBlock,
    Transformer: CPUTransformer,
    AttentionPoolHead: CPUAttentionPoolHead,
    MultimodalDecoder: CPUMultimodalDecoder,
}
PLAIN = {cpu: plain for plain, cpu in SWAPS.items()}


def apply(model: nn.Module, streams: Sequence | None = None, training: bool = False) -> nn.Module:
    """Swap the CPU versions into `model` in place, and return it.

    `streams`: what each trunk splits its rows over. None: one stream per core, with the
    process-wide settings of `settings.tune`; () keeps each trunk on one stream (and the BLAS
    threads as they are); a list of CPU streams uses those. `training`: the model will be
    trained, so its linear layers give weight gradients in the weights' row order.
    """
    if streams is None:
        streams = settings.tune()
    else:
        settings.tune(split=False)
    in_trunks = {
        id(inner)
        for _, module in model.named_modules()
        if isinstance(module, Transformer)
        for _, inner in module.named_modules()
    }
    for _, module in model.named_modules():
        cls = SWAPS.get(type(module))
        if cls is not None:
            module.__class__ = cls
        if isinstance(module, CPULinear):
            object.__setattr__(module, "row_order_gradient", training)
        splits = isinstance(module, CPUTransformer) or (
            isinstance(module, CPULinear) and id(module) not in in_trunks
        )
        if splits:
            object.__setattr__(module, "streams", tuple(streams))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Turn the CPU versions back into the plain classes, in place."""
    for _, module in model.named_modules():
        cls = PLAIN.get(type(module))
        if cls is not None:
            module.__dict__.pop("streams", None)
            module.__dict__.pop("row_order_gradient", None)
            module.__class__ = cls
    return model
