"""Decoding and preprocessing (aimv2_mlx/images.py).

Every test image is built here, in tmp_path, with Pillow/numpy; the photos are scikit-image's
bundled samples (and the copies of them in examples/photos/).
"""

from __future__ import annotations

import gc
import math
import struct
import warnings
import zlib
from pathlib import Path

import aimv2_mlx  # noqa: F401  (before mlx)
from aimv2_mlx.config import PreprocessConfig
from aimv2_mlx.data.sources import discover
from aimv2_mlx.images import (
    ImageError,
    native_size,
    open_image,
    preprocess,
    to_pixels,
)

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def rgb(path_or_image) -> np.ndarray:
    image = open_image(path_or_image)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def skimage_photos() -> dict[str, np.ndarray]:
    data = pytest.importorskip("skimage.data")
    astronaut, chelsea, coffee, rocket = (
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
    )
    return {
        "astronaut": astronaut,  # 512x512 square
        "chelsea": chelsea,  # 451x300 landscape
        "coffee": coffee,  # 600x400 landscape
        # 640x427: long side 335.7 -> 335, odd crop excess
        "rocket": rocket,
        "coffee-portrait": np.rot90(coffee).copy(),  # 400x600 portrait
        "tall": astronaut[:, 150:351].copy(),  # 201x512, odd width
        "small": chelsea[::3, ::3].copy(),  # 151x100: smaller than 224, upscaled
    }


@pytest.fixture(scope="module")
def photos():
    return skimage_photos()


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [224, 336, 448])
def test_clip_mode_matches_transformers_clip_image_processor(transformers_reference, photos, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    config = PreprocessConfig.for_mode("clip", size)
    for name, array in photos.items():
        image = Image.fromarray(array)
        reference = processor(images=image, return_tensors="np")["pixel_values"][0]  # (3, H, W)
        ours = to_pixels(open_image(image), config)
        assert ours.dtype == np.float32 and ours.shape == (size, size, 3), name
        err = np.abs(ours.transpose(2, 0, 1) - reference).max()
        assert err <= 1e-5, f"{name} at {size}: max abs diff {err}"


def test_clip_mode_matches_processor_on_the_example_jpegs(transformers_reference):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()
    files = photo_files()
    assert [f.name for f in files] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    batch = np.asarray(preprocess(files))
    for path, ours in zip(files, batch, strict=True):
        with Image.open(path) as image:
            reference = processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][
                0
            ]
        assert np.abs(ours.transpose(2, 0, 1) - reference).max() <= 1e-5, path.name


def test_example_photos_are_small_real_jpegs():
    names = sorted(p.name for p in PHOTOS.iterdir())
    assert names == ["LICENSES.md", "astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    licences = (PHOTOS / "LICENSES.md").read_text()
    for path in photo_files():
        assert path.stat().st_size < 150_000, path.name
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) >= 300
        assert path.name in licences


def test_clip_mode_uses_transformers_truncation_and_floor_crop(photos):
    """rocket (640x427) -> 335x224 (int(), not round: 336), crop offset 111 // 2 = 55 (not 56)."""
    image = Image.fromarray(photos["rocket"])
    resized = image.resize((335, 224), Image.Resampling.BICUBIC).crop((55, 0, 55 + 224, 224))
    expected = (np.asarray(resized, np.float32) / 255 - np.float32(CLIP_MEAN)) / np.float32(
        CLIP_STD
    )
    ours = to_pixels(image, PreprocessConfig.for_mode("clip", 224))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def ml_aim_reference(image: Image.Image, size: int) -> np.ndarray:
    """ml-aim README recipe written out by hand: Resize(ceil(s / 0.875), bicubic), CenterCrop(s)
    with torchvision's offsets, ToTensor, Normalize(ImageNet)."""
    resize_to = math.ceil(size / 0.875)
    w, h = image.size
    if w <= h:
        new_w, new_h = resize_to, int(resize_to * h / w)
    else:
        new_w, new_h = int(resize_to * w / h), resize_to
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, np.float64) / 255.0
    return ((pixels - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype(np.float32)


@pytest.mark.parametrize("size", [224, 336])
def test_ml_aim_mode_matches_hand_computed_reference(photos, size):
    cases = dict(photos)
    # 400x599 -> 383x256 at size 224: crop excess 159, torchvision offset round(79.5) = 80, floor 79
    cases["coffee-599"] = photos["coffee"][:, :599].copy()
    config = PreprocessConfig.for_mode("ml-aim", size)
    assert config.mean == IMAGENET_MEAN and config.std == IMAGENET_STD
    for name, array in cases.items():
        image = Image.fromarray(array)
        ours = to_pixels(open_image(image), config)
        assert ours.shape == (size, size, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(
            ours, ml_aim_reference(image, size), atol=1e-5, rtol=0, err_msg=name
        )


def test_native_mode_keeps_aspect_with_patch_multiples(photos):
    config = PreprocessConfig.for_mode("native", 224)
    for name, array in photos.items():
        image = Image.fromarray(array)
        ours = to_pixels(open_image(image), config)
        h, w, c = ours.shape
        assert c == 3 and h % 14 == 0 and w % 14 == 0, (name, ours.shape)
        scale = 224 / min(image.size)
        assert abs(w - image.width * scale) <= 7 and abs(h - image.height * scale) <= 7, (
            name,
            ours.shape,
        )
        assert abs(min(h, w) - 224) <= 7
        resized = image.resize((w, h), Image.Resampling.BICUBIC)
        expected = (np.asarray(resized, np.float32) / 255 - np.float32(CLIP_MEAN)) / np.float32(
            CLIP_STD
        )
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0, err_msg=name)


def test_native_size_examples():
    assert native_size(512, 512, 224, 14) == (224, 224)
    assert native_size(451, 300, 224, 14) == (336, 224)  # 336.7 -> 24 patches
    assert native_size(200, 512, 224, 14) == (224, 574)  # 573.4 -> 41 patches
    assert native_size(10, 5000, 224, 14) == (224, 112000)
    assert native_size(5000, 3, 14, 14)[1] == 14  # never below one patch


def test_preprocess_paths_give_a_float32_batch(tmp_path, photos):
    paths = []
    for name in ("astronaut", "chelsea", "tall"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(photos[name]).save(paths[-1])
    batch = preprocess([str(paths[0]), paths[1], paths[2]], model=None)
    assert isinstance(batch, mx.array)
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == mx.float32
    config = PreprocessConfig()
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(np.asarray(batch[i]), to_pixels(open_image(path), config))
    single = preprocess(paths[0])
    assert single.shape == (1, 224, 224, 3)
    with pytest.raises(ValueError):
        preprocess([])


def test_preprocess_modes_and_native_lists(photos):
    square, wide = Image.fromarray(photos["astronaut"]), Image.fromarray(photos["chelsea"])
    ml_aim = preprocess([square, wide], mode="ml-aim")
    assert isinstance(ml_aim, mx.array) and ml_aim.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(
        np.asarray(ml_aim[1]), ml_aim_reference(wide, 224), atol=1e-5, rtol=0
    )

    same = preprocess([square, square.copy()], mode="native")
    assert isinstance(same, mx.array) and same.shape == (2, 224, 224, 3)

    mixed = preprocess([square, wide, square], mode="native")
    assert isinstance(mixed, list) and len(mixed) == 3
    assert [tuple(a.shape) for a in mixed] == [(1, 224, 224, 3), (1, 224, 336, 3), (1, 224, 224, 3)]
    assert all(a.dtype == mx.float32 for a in mixed)
    expected = to_pixels(wide, PreprocessConfig.for_mode("native", 224))
    np.testing.assert_array_equal(np.asarray(mixed[1][0]), expected)

    custom = PreprocessConfig.for_mode("clip", 336)
    assert preprocess(square, config=custom).shape == (1, 336, 336, 3)


# --------------------------------------------------------------------------- decoding


def quadrants(width: int = 64, height: int = 32) -> np.ndarray:
    """top-left red, top-right blue, bottom-left green, bottom-right white: asymmetric in x and
    y.
    """
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, : width // 2] = RED
    a[: height // 2, width // 2 :] = BLUE
    a[height // 2 :, : width // 2] = GREEN
    a[height // 2 :, width // 2 :] = WHITE
    return a


def away_from_edges(image: np.ndarray, margin: int) -> np.ndarray:
    """Pixels whose (2 margin + 1)-square neighbourhood is one colour."""
    h, w, _ = image.shape
    keep = np.zeros((h, w), bool)
    keep[margin : h - margin, margin : w - margin] = True
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            shifted = np.roll(image, (dy, dx), axis=(0, 1))
            keep &= (shifted == image).all(axis=2)
    return keep


def save_with_orientation(path: Path, array: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, quality=95, subsampling=0, exif=exif)


@pytest.mark.parametrize("orientation, turns", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
    stored = quadrants()
    path = tmp_path / f"orient{orientation}.jpg"
    save_with_orientation(path, stored, orientation)
    with Image.open(path) as raw:
        assert raw.getexif()[0x0112] == orientation and raw.size == (64, 32)
    out = rgb(path)
    expected = np.rot90(stored, k=turns)  # k=-1: 90 degrees clockwise
    assert out.shape == expected.shape
    interior = away_from_edges(expected, 3)  # JPEG rings at the colour edges
    assert interior.sum() > expected.shape[0] * expected.shape[1] // 2
    assert np.abs(out - expected)[interior].max() <= 12
    assert np.abs(out - expected).mean() <= 3


def test_exif_orientation_6_by_hand(tmp_path):
    """Stored 64x32 with left half red, right half blue; orientation 6 displays it turned 90
    degrees clockwise: 32 wide, 64 tall, red on top, blue below."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = RED
    stored[:, 32:] = BLUE
    path = tmp_path / "six.jpg"
    save_with_orientation(path, stored, 6)
    out = rgb(path)
    assert out.shape == (64, 32, 3)
    assert np.abs(out[4:28] - RED).max() <= 12
    assert np.abs(out[36:60] - BLUE).max() <= 12


def test_exif_orientation_of_an_in_memory_image(tmp_path):
    path = tmp_path / "eight.jpg"
    save_with_orientation(path, quadrants(), 8)
    with Image.open(path) as image:
        image.load()
        out = rgb(image)
    assert out.shape == (64, 32, 3)
    assert np.abs(out[4:12, 4:12] - BLUE).max() <= 12  # top-left shows the stored top-right


def test_grayscale_L(tmp_path):
    a = np.array([[0, 77, 200, 255]], np.uint8)
    Image.fromarray(a).save(tmp_path / "l.png")
    out = rgb(tmp_path / "l.png")
    np.testing.assert_array_equal(out, np.repeat(a[..., None], 3, axis=2))


def test_one_bit(tmp_path):
    a = np.array([[True, False, True], [False, False, True]])
    Image.fromarray(a).save(tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as raw:
        assert raw.mode == "1"
    out = rgb(tmp_path / "one.png")
    np.testing.assert_array_equal(out, np.where(a[..., None], 255, 0).repeat(3, axis=2))


def palette_image() -> Image.Image:
    image = Image.new("P", (3, 2))
    image.putdata([0, 1, 2, 2, 1, 0])
    image.putpalette([*RED, *GREEN, *BLUE])
    return image


@pytest.mark.parametrize("suffix", [".png", ".gif", ".bmp"])
def test_palette_without_transparency(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    palette_image().save(path)
    with Image.open(path) as raw:
        assert raw.mode == "P"
    expected = np.array([[RED, GREEN, BLUE], [BLUE, GREEN, RED]])
    np.testing.assert_array_equal(rgb(path), expected)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparent_index_goes_white(tmp_path, suffix):
    path = tmp_path / f"pt{suffix}"
    palette_image().save(path, transparency=0)
    expected = np.array([[WHITE, GREEN, BLUE], [BLUE, GREEN, WHITE]])
    np.testing.assert_array_equal(rgb(path), expected)


def test_palette_with_partial_alpha(tmp_path):
    path = tmp_path / "palpha.png"
    # red half, green opaque, blue clear
    palette_image().save(path, transparency=bytes([128, 255, 0]))
    out = rgb(path)
    assert np.abs(out[0, 0] - (255, 127, 127)).max() <= 1
    np.testing.assert_array_equal(out[0, 1], GREEN)
    np.testing.assert_array_equal(out[0, 2], WHITE)


def test_rgba_composites_onto_white(tmp_path):
    a = np.array([[[0, 0, 255, 128], [0, 0, 0, 0], [10, 20, 30, 255], [200, 100, 0, 64]]], np.uint8)
    Image.fromarray(a).save(tmp_path / "rgba.png")
    out = rgb(tmp_path / "rgba.png")
    alpha = a[..., 3:].astype(float) / 255
    expected = a[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(out - expected).max() <= 1
    np.testing.assert_array_equal(out[0, 0], (127, 127, 255))  # half-transparent blue on white
    np.testing.assert_array_equal(out[0, 1], WHITE)  # fully transparent black -> white


def test_la_composites_onto_white(tmp_path):
    image = Image.new("LA", (3, 1))
    image.putdata([(0, 128), (200, 255), (50, 0)])
    image.save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as raw:
        assert raw.mode == "LA"
    np.testing.assert_array_equal(rgb(tmp_path / "la.png")[0], [(127,) * 3, (200,) * 3, WHITE])


def test_transparency_colour_key_goes_white(tmp_path):
    gray = Image.fromarray(np.array([[0, 90]], np.uint8))
    gray.save(tmp_path / "lkey.png", transparency=0)
    np.testing.assert_array_equal(rgb(tmp_path / "lkey.png")[0], [WHITE, (90,) * 3])
    colour = Image.fromarray(np.array([[RED, BLUE]], np.uint8))
    colour.save(tmp_path / "rgbkey.png", transparency=RED)
    np.testing.assert_array_equal(rgb(tmp_path / "rgbkey.png")[0], [WHITE, BLUE])


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
@pytest.mark.parametrize(
    "cmyk, expected",
    [
        ((255, 0, 0, 0), (0, 255, 255)),  # cyan
        ((0, 255, 0, 0), (255, 0, 255)),  # magenta
        ((0, 0, 255, 0), (255, 255, 0)),  # yellow
        ((0, 0, 0, 255), (0, 0, 0)),  # black
        ((0, 0, 0, 0), (255, 255, 255)),  # paper
    ],
)
def test_cmyk(tmp_path, suffix, cmyk, expected):
    path = tmp_path / f"cmyk{suffix}"
    Image.new("CMYK", (16, 16), cmyk).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = rgb(path)
    assert np.abs(out - expected).max() <= 2, out[0, 0]


SIXTEEN = np.array([[0, 257, 1000, 32767], [32768, 50000, 65280, 65535]], np.uint16)
SIXTEEN_8 = np.array([[0, 1, 4, 127], [128, 195, 254, 255]])  # round(v / 65535 * 255)


@pytest.mark.parametrize(
    "name, array",
    [
        ("g16.png", SIXTEEN),
        ("g16.tif", SIXTEEN),
        ("g16be.tif", SIXTEEN.astype(">u2")),
    ],
)
def test_sixteen_bit_grayscale_scales_not_clips(tmp_path, name, array):
    Image.fromarray(array).save(tmp_path / name)
    with Image.open(tmp_path / name) as raw:
        assert raw.mode.startswith("I;16") or raw.mode == "I", raw.mode
    out = rgb(tmp_path / name)
    np.testing.assert_array_equal(out, np.repeat(SIXTEEN_8[..., None], 3, axis=2))


def test_32_bit_integer_and_float_images(tmp_path):
    Image.fromarray(SIXTEEN.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I, 16-bit range
    np.testing.assert_array_equal(rgb(tmp_path / "i32.tif")[..., 0], SIXTEEN_8)
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")  # mode F
    np.testing.assert_array_equal(rgb(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])


def write_png_rgb16(path: Path, array: np.ndarray) -> None:
    """A 48-bit (16 bits per channel) RGB PNG, written by hand: Pillow cannot save one."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_rgb_png(tmp_path):
    a = np.zeros((1, 4, 3), np.uint16)
    a[0, 0] = (65535, 0, 0)
    a[0, 1] = (0, 32768, 65535)
    a[0, 2] = (257 * 77, 257 * 128, 257 * 200)
    a[0, 3] = (1000, 32767, 65280)
    write_png_rgb16(tmp_path / "rgb16.png", a)
    out = rgb(tmp_path / "rgb16.png")
    assert np.abs(out - a / 65535 * 255).max() <= 1, out


def test_multiframe_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, GREEN)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    out = rgb(path)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out.reshape(-1, 3), np.tile(RED, (64, 1)))
    with Image.open(path) as image:  # an in-memory image left on a later frame
        image.seek(2)
        np.testing.assert_array_equal(rgb(image)[0, 0], RED)


def test_files_are_closed(tmp_path):
    Image.fromarray(quadrants()).save(tmp_path / "a.png")
    Image.fromarray(quadrants()).save(tmp_path / "b.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("a.png", "b.jpg"):
            open_image(tmp_path / name)
        with pytest.raises(ImageError):
            open_image(tmp_path / "a.png", max_megapixels=1e-4)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_truncated_jpeg_raises_image_error_naming_the_file(tmp_path, photos):
    full = tmp_path / "full.jpg"
    Image.fromarray(photos["chelsea"]).save(full, quality=90)
    path = tmp_path / "cut-off.jpg"
    path.write_bytes(full.read_bytes()[:8000])
    with pytest.raises(ImageError, match=r"cut-off\.jpg"):
        open_image(path)
    with pytest.raises(ImageError, match=r"cut-off\.jpg"):
        preprocess([full, path])


@pytest.mark.parametrize("content", [b"this is not an image\n", b""])
def test_not_an_image_raises_image_error_naming_the_file(tmp_path, content):
    path = tmp_path / "notes.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"notes\.jpg") as info:
        open_image(path)
    assert isinstance(info.value, ValueError)


def test_missing_file_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match=r"absent\.png"):
        open_image(tmp_path / "absent.png")


def test_megapixel_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    with pytest.raises(ImageError, match=r"big\.png.*400x300.*0\.1-megapixel"):
        open_image(path, max_megapixels=0.1)
    with pytest.raises(ImageError, match="400x300"):
        open_image(Image.new("RGB", (400, 300)), max_megapixels=0.1)
    assert open_image(path, max_megapixels=0.12).size == (400, 300)
    assert open_image(path, max_megapixels=None).size == (400, 300)


def photo_files() -> list[Path]:
    return [Path(item.path) for item in discover([PHOTOS])]
