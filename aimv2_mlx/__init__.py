"""aimv2-mlx: Apple's AIMv2 vision encoders in MLX.

A system OpenBLAS is loaded (Linux) before MLX is imported; see `cpu.blas`.
"""

from . import cpu  # noqa: F401  (first: loads the BLAS before MLX)
from .config import EncoderConfig, ModelConfig, PreprocessConfig, TextConfig, preset  # noqa: E402
from .embed import embed, embed_folder  # noqa: E402
from .encoder import VisionEncoder  # noqa: E402
from .errors import Aimv2Error, SettingError, UnusableFileError  # noqa: E402
from .images import open_image, preprocess  # noqa: E402
from .lit import LiT  # noqa: E402
from .index import read_embeddings  # noqa: E402
from .model import (  # noqa: E402
    HubUnreachableError, ModelNotFoundError, build, load, load_default, parameter_count, save)
from .weights import CheckpointError  # noqa: E402
from .zeroshot import zero_shot  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Aimv2Error",
    "CheckpointError",
    "EncoderConfig",
    "HubUnreachableError",
    "LiT",
    "ModelConfig",
    "ModelNotFoundError",
    "PreprocessConfig",
    "SettingError",
    "TextConfig",
    "UnusableFileError",
    "VisionEncoder",
    "build",
    "embed",
    "embed_folder",
    "load",
    "load_default",
    "open_image",
    "parameter_count",
    "preprocess",
    "preset",
    "read_embeddings",
    "save",
    "zero_shot",
]
