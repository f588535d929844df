"""Everything CPU-specific: the BLAS MLX calls, fast float32 kernels, and using every core.

Importing this package loads a system OpenBLAS (Linux) before MLX is imported (see `blas`),
which is why `aimv2_mlx` imports it first.
"""

from .blas import load_openblas, on_cpu

load_openblas()

__all__ = ["load_openblas", "on_cpu"]
