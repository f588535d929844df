"""Everything CPU-specific: the BLAS MLX calls, fast float32 kernels, and using every core.

Importing this package loads a system OpenBLAS (Linux) before MLX is imported, with the kernel
that suits this CPU (see `blas`), which is why `aimv2_mlx` imports it first.
"""

from .blas import get_blas_threads, library_path, load_openblas, on_cpu, set_blas_threads

load_openblas()

__all__ = ["get_blas_threads", "library_path", "load_openblas", "on_cpu", "set_blas_threads"]
