"""Checkpoint conversion to the aimv2-mlx layout (`aimv2 convert`)."""

from .convert import convert

__all__ = ["convert"]
