"""Everything CPU-specific, behind one call: `apply(model)`.

* `blas`: the BLAS MLX calls on Linux — a system OpenBLAS (or a library the user names) loaded
  before MLX, with the kernel that suits this CPU. Importing this package loads it, which is
  why `aimv2_mlx` imports it first.
* `kernels`: float32 exp, SiLU·mul and attention from vectorised arithmetic, with gradients.
* `modules`: subclasses of the transformer pieces that use them and split a trunk's rows over
  one stream per core; `apply`/`remove` swap them into or out of a model.
* `update`: the clipped optimizer update with the parameters shared out over the streams.
* `settings`: the process-wide settings that needs (BLAS threads, MLX's cache limit), in one
  place, restorable; and MLX's breadth-first task order, set at import (MLX reads it once).

`load()` and the training loop call `apply` when MLX computes on the CPU; on GPUs nothing of
this is applied.
"""

from .blas import get_blas_threads, library_path, load_openblas, on_cpu, set_blas_threads

load_openblas()

from . import settings  # noqa: E402

settings.schedule_breadth_first()  # before anything evaluates

from .modules import apply, remove  # noqa: E402
from .update import clipped_update, model_streams  # noqa: E402

__all__ = [
    "apply",
    "clipped_update",
    "get_blas_threads",
    "library_path",
    "load_openblas",
    "model_streams",
    "on_cpu",
    "remove",
    "set_blas_threads",
]
