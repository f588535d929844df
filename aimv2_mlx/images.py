"""Decode images correctly and turn them into the pixels an AIMv2 model expects.

Decoding applies EXIF orientation and converts every Pillow mode to 8-bit RGB: 16-bit and
32-bit integer images are scaled (not clipped), transparency is composited onto white, CMYK
goes through Pillow's converter. Preprocessing follows the hub's `CLIPImageProcessor`
("clip", the default for released checkpoints), ml-aim's README recipe ("ml-aim"), or keeps the
aspect ratio with both sides a multiple of the patch size ("native").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import BinaryIO

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps

from .config import PreprocessConfig
from .errors import Aimv2Error, SettingError
from .folders import open_regular

try:  # HEIC/HEIF through the optional `heif` extra
    from pillow_heif import register_heif_opener
except ImportError:
    pass
else:
    register_heif_opener()

ImageInput = str | os.PathLike | Image.Image | BinaryIO
DEFAULT_MAX_MEGAPIXELS = 178.0
# native resolution keeps the aspect ratio: at most 16 squares' worth of patches
NATIVE_MAX_AREA = 16
_BACKGROUND = (255, 255, 255)


class ImageError(Aimv2Error, ValueError):
    """An image that could not be used; the message names the file and the reason."""


def pillow_megapixels() -> float | None:
    """The largest image Pillow decodes (2 x `PIL.Image.MAX_IMAGE_PIXELS`, its decompression-bomb
    error), in megapixels; None when a program has lifted it. This module never changes it."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS / 1e6


def check_megapixel_limit(max_megapixels: float | None, name: str = "max_megapixels") -> None:
    """Refuse a limit that is not positive, or that Pillow's decompression-bomb limit would
    silently lower: the limit asked for is the one every image is held to."""
    ceiling = pillow_megapixels()
    if max_megapixels is not None and not max_megapixels > 0:
        raise SettingError(f"{name} {max_megapixels:g}: must be greater than 0")
    if max_megapixels is not None and ceiling is not None and max_megapixels > ceiling:
        raise SettingError(
            f"{name} {max_megapixels:g}: above Pillow's decompression-bomb limit of "
            f"{ceiling:g} megapixels (2 x PIL.Image.MAX_IMAGE_PIXELS), which would "
            "refuse larger images first"
        )


def open_image(
    source: ImageInput,
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    name: str | None = None,
) -> Image.Image:
    """Open a file, a binary file object (or take a PIL image) and return an upright 8-bit RGB
    image.

    Files are decoded fully and closed before returning. Any failure (missing, not an image,
    truncated, too large) raises `ImageError` with `name` (default: the file's) in the message.
    """
    if isinstance(source, Image.Image):
        return _upright_rgb(source, name or "<PIL image>", max_megapixels)
    if name is None:
        name = (
            os.fspath(source)
            if isinstance(source, (str, os.PathLike))
            else getattr(source, "name", "<stream>")
        )
    if isinstance(source, (str, os.PathLike)):
        try:
            handle = open_regular(os.path.expanduser(source))
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
        with handle:
            return open_image(handle, max_megapixels, name)
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as exc:  # larger than both limits (`check_megapixel_limit`)
        limit = min(max_megapixels or math.inf, pillow_megapixels() or math.inf)
        raise ImageError(f"{name}: exceeds the {limit:g}-megapixel limit ({exc})") from None
    except Exception as exc:
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None
    with image:
        return _upright_rgb(image, name, max_megapixels)


def _upright_rgb(image: Image.Image, name, max_megapixels: float | None) -> Image.Image:
    if max_megapixels is not None and image.width * image.height > max_megapixels * 1e6:
        raise ImageError(
            f"{name}: {image.width}x{image.height} exceeds the {max_megapixels:g}-megapixel limit"
        )
    try:
        if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
            image.seek(0)
        image.load()  # decode now: truncated data fails here, and the file can be closed after
        image = ImageOps.exif_transpose(image)  # always a new image, never the open file
        return to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{name}: could not decode ({type(exc).__name__}: {exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, scaling high bit depths and flattening alpha onto white.

    Transparency in any form (an alpha band, a palette with alpha, a `transparency` colour key)
    is composited onto white, as transformers' `convert_rgb` does.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode == "La":  # premultiplied: Pillow has no La -> RGBA conversion
        image, mode = image.convert("LA"), "LA"
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa")
        or "transparency" in image.info
        or (mode == "P" and image.palette is not None and image.palette.mode == "RGBA")
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    elif mode.startswith("I;16") or values.max(initial=0) <= 65535:
        top = 65535.0
    else:
        top = float(2**32 - 1)
    return np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)


def _shortest_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size with the shorter side `size` (transformers' rounding of the longer one)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def _offset(extra: int, rounding: str) -> int:
    return extra // 2 if rounding == "floor" else round(extra / 2.0)


def resize_shortest(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is `size` (transformers' rounding of the longer one)."""
    return image.resize(_shortest_size(*image.size, size), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int, rounding: str = "floor") -> Image.Image:
    """Centre crop; `rounding` "floor" is transformers' offset, "round" torchvision's."""
    w, h = image.size
    left, top = _offset(w - size, rounding), _offset(h - size, rounding)
    return image.crop((left, top, left + size, top + size))


def resize_then_crop(image: Image.Image, shortest: int, crop: int, rounding: str) -> Image.Image:
    """`center_crop(resize_shortest(image, shortest), crop)` without resizing what the crop drops.

    Up to 8:1 the whole image is resized, exactly as transformers' CLIPImageProcessor does; a
    longer strip (a 65535x1 PNG would resize to 3.3 gigapixels at 224) resamples only the source
    box that becomes the crop, which agrees to a few levels of 255.
    """
    w, h = image.size
    new_w, new_h = _shortest_size(w, h, shortest)
    if max(new_w, new_h) <= 8 * shortest:
        return center_crop(image.resize((new_w, new_h), Image.Resampling.BICUBIC), crop, rounding)
    left, top = _offset(new_w - crop, rounding), _offset(new_h - crop, rounding)
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return image.resize((crop, crop), Image.Resampling.BICUBIC, box=box)


def native_size(width: int, height: int, shortest: int, patch: int) -> tuple[int, int]:
    """Scale so the shorter side is about `shortest`, keep aspect, round both sides to patches."""
    scale = shortest / min(width, height)
    return (
        max(patch, round(width * scale / patch) * patch),
        max(patch, round(height * scale / patch) * patch),
    )


def to_pixels(image: Image.Image, config: PreprocessConfig, patch_size: int = 14) -> np.ndarray:
    """One RGB image to a normalised float32 (H, W, 3) array."""
    if config.mode == "clip":
        image = resize_then_crop(image, config.size, config.size, "floor")
    elif config.mode == "ml-aim":
        image = resize_then_crop(
            image, math.ceil(config.size / config.crop_fraction), config.size, "round"
        )
    elif config.mode == "native":
        width, height = native_size(*image.size, config.size, patch_size)
        if width * height > NATIVE_MAX_AREA * config.size**2:
            raise ImageError(
                f"{image.width}x{image.height} is too elongated for native resolution "
                f"({width}x{height} pixels, over {NATIVE_MAX_AREA}x the {config.size}-pixel square)"
            )
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    else:
        raise SettingError(f"unknown preprocessing mode {config.mode!r}")
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    return (pixels - mean) / std


def preprocess(
    images: ImageInput | Iterable[ImageInput],
    model=None,
    mode: str | None = None,
    config: PreprocessConfig | None = None,
):
    """Paths or PIL images to model-ready channels-last float32 pixels, as an `mx.array`.

    The preprocessing is the model's own (`model.config.preprocess`) unless `mode`
    ("clip", "ml-aim", "native") or a full `config` is given. Native-resolution images of
    different shapes cannot share a batch: then a list of (1, H, W, 3) arrays is returned.
    """
    config = _choose_config(model, mode, config)
    patch = model.config.vision.patch_size if model is not None else 14
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    arrays = [to_pixels(open_image(img), config, patch) for img in images]
    if not arrays:
        raise SettingError("preprocess() needs at least one image")
    if len({a.shape for a in arrays}) > 1:
        return [mx.array(a[None]) for a in arrays]
    return mx.array(np.stack(arrays))


def _choose_config(model, mode: str | None, config: PreprocessConfig | None) -> PreprocessConfig:
    if config is not None:
        return config
    base = model.config.preprocess if model is not None else PreprocessConfig()
    if mode is None or mode == base.mode:
        return base
    return PreprocessConfig.for_mode(mode, base.size)
