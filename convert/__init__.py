"""Checkpoint conversion to the aimv2-mlx layout (`aimv2 convert`); the checkpoint readers it
shares with `aimv2_mlx.load()` live in the library (`aimv2_mlx.checkpoint_io`)."""

from .convert import Conversion, convert, upload

__all__ = ["Conversion", "convert", "upload"]
