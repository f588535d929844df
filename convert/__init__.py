"""Checkpoint conversion to the aimv2-mlx layout (`aimv2 convert`), and the torch-free readers
that `aimv2_mlx.load()` shares with it."""

from .convert import Conversion, convert, upload

__all__ = ["Conversion", "convert", "upload"]
