"""Quantization of the transformer linears (never the patch projection, heads or projectors).

`aimv2 convert -q 4|8` stores those linears as MLX affine-quantized weights and records
`{"bits", "group_size"}` in config.json; `load()` re-applies the same structure. On the CPU,
MLX's quantized matmul runs ~35x slower than float32 BLAS (2.7 vs 92 GFLOP/s measured here), so
`load()` there dequantizes once into float32 linears by default: the same values, the fast path.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import SettingError

QUANTIZED_MODULES = "trunk.blocks.*: attn.qkv, attn.proj, mlp.fc1, mlp.fc2, mlp.fc3"


def is_quantizable(path: str, module: nn.Module) -> bool:
    """Linears inside transformer blocks (vision and text trunks), nothing else."""
    return isinstance(module, nn.Linear) and "trunk.blocks." in path


def quantize_model(model: nn.Module, bits: int, group_size: int) -> None:
    """Swap every quantizable linear for an `nn.QuantizedLinear` (in place)."""
    if bits not in (4, 8):
        raise SettingError(f"--q-bits must be 4 or 8, not {bits}")
    for path, module in model.named_modules():
        if is_quantizable(path, module) and module.weight.shape[1] % group_size:
            raise SettingError(
                f"--q-group-size {group_size} does not divide the input width "
                f"{module.weight.shape[1]} of {path}"
            )
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=is_quantizable)


def quantize_weight(weight: mx.array, bits: int, group_size: int) -> dict[str, mx.array]:
    """One linear's stored tensors: {"weight": packed uint32, "scales", "biases"}."""
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    return {"weight": packed, "scales": scales, "biases": biases}


def dequantize_model(model: nn.Module) -> None:
    """Replace each `nn.QuantizedLinear` by an `nn.Linear` holding its dequantized weight."""
    swaps = []
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = mx.dequantize(
                module.weight,
                module.scales,
                module.biases,
                group_size=module.group_size,
                bits=module.bits,
            )
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            linear.weight = weight
            if "bias" in module:
                linear.bias = module.bias
            swaps.append((path, linear))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
        mx.eval(model.parameters())
