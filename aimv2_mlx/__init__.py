"""aimv2-mlx: Apple's AIMv2 vision encoders in MLX.

A system OpenBLAS is loaded (Linux) before MLX is imported; see `cpu.blas`.
"""

from . import cpu  # noqa: F401  (first: loads the BLAS before MLX)
from .config import EncoderConfig, ModelConfig, PreprocessConfig, TextConfig, preset
from .embed import embed, embed_folder
from .encoder import VisionEncoder
from .errors import Aimv2Error, SettingError, UnusableFileError
from .images import open_image, preprocess
from .index import read_embeddings
from .lit import LiT
from .model import (
    HubUnreachableError,
    ModelNotFoundError,
    build,
    load,
    load_default,
    parameter_count,
    save,
)
from .weights import CheckpointError
from .zeroshot import zero_shot

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
