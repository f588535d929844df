"""`aimv2 data shapes`: a procedural captioned dataset with per-image attribute labels.

Each image holds 1–3 coloured shapes (circle, square, triangle; no overlaps) on a textured
background (stripes, checks or noise in muted colours). One shape is large — the primary, so
that the labels are visible in the image — the others small or medium. The caption names every
shape with its size and colour, the primary first, and says where it sits relative to the
second, e.g. "a large red circle above a small blue square". The labels describe the primary
shape — colour, shape, position (the image quadrant of its centre) — and the shape count, for
linear probes. Image i depends only on (seed, i), so any subset regenerates identically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import SettingError
from ..folders import atomic_folder

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# side / diameter as a fraction of the image side
SIZES = {"small": 0.12, "medium": 0.19, "large": 0.3}
# pixels: one patch of AIMv2's 14-pixel patchifier (arXiv 2411.14402); less feeds no encoder
MIN_SIZE = 14
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": POSITIONS,
    "count": ("1", "2", "3"),
}


@dataclass
class Shape:
    kind: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float


def make_sample(seed: int, index: int, size: int = 112) -> tuple[Image.Image, str, dict]:
    """(image, caption, labels) of sample `index`; deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size)
    shapes = _place(rng, size, int(rng.integers(1, 4)))
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw(draw, shape)
    first = shapes[0]
    labels = {
        "color": first.color,
        "shape": first.kind,
        "position": POSITIONS[2 * (first.cy >= size / 2) + (first.cx >= size / 2)],
        "count": str(len(shapes)),
    }
    return image, caption(shapes), labels


def caption(shapes: list[Shape]) -> str:
    names = [f"a {s.size} {s.color} {s.kind}" for s in shapes]
    if len(shapes) == 1:
        return names[0]
    text = f"{names[0]} {_relation(shapes[0], shapes[1])} {names[1]}"
    if len(shapes) == 3:
        text += f" and {names[2]}"
    return text


def _relation(a: Shape, b: Shape) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(60, 200, size=3)
    other = np.clip(base + rng.integers(-50, 51, size=3), 0, 255)
    y, x = np.mgrid[0:size, 0:size]
    kind = rng.integers(0, 3)
    period = int(rng.integers(4, 16))
    if kind == 0:  # stripes at a random angle
        angle = rng.uniform(0, np.pi)
        pattern = (np.floor((x * np.cos(angle) + y * np.sin(angle)) / period) % 2)[..., None]
    elif kind == 1:  # checks
        pattern = ((x // period + y // period) % 2)[..., None]
    else:  # noise
        pattern = rng.uniform(0, 1, size=(size, size, 1))
    pixels = base * (1 - pattern) + other * pattern + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _place(rng: np.random.Generator, size: int, count: int) -> list[Shape]:
    shapes: list[Shape] = []
    while len(shapes) < count:
        for _ in range(100):
            size_name = "large" if not shapes else ("small", "medium")[int(rng.integers(0, 2))]
            radius = SIZES[size_name] * size / 2 * 1.4
            cx, cy = rng.uniform(radius, size - radius, size=2)
            if all(np.hypot(cx - s.cx, cy - s.cy) > radius + s.radius + 2 for s in shapes):
                kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
                color = tuple(COLORS)[int(rng.integers(0, len(COLORS)))]
                shapes.append(Shape(kind, color, size_name, float(cx), float(cy), float(radius)))
                break
        else:  # no room left: fewer shapes
            break
    return shapes


def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    r = s.radius / 1.4
    fill = COLORS[s.color]
    if s.kind == "circle":
        draw.ellipse((s.cx - r, s.cy - r, s.cx + r, s.cy + r), fill=fill)
    elif s.kind == "square":
        draw.rectangle((s.cx - r, s.cy - r, s.cx + r, s.cy + r), fill=fill)
    else:
        draw.polygon(
            [(s.cx, s.cy - r * 1.15), (s.cx - r * 1.15, s.cy + r), (s.cx + r * 1.15, s.cy + r)],
            fill=fill,
        )


def write_shapes(out: str | os.PathLike, n: int, size: int = 112, seed: int = 0) -> Path:
    """Write n samples: images/NNNNNN.png with .txt caption sidecars, captions.jsonl, labels.jsonl.

    Files are written into a temporary folder that is renamed into place at the end.
    """
    if n < 1 or size < MIN_SIZE:
        raise SettingError(
            f"{n} images of {size} pixels: give at least 1 image of at least {MIN_SIZE} pixels"
        )
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    with atomic_folder(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "captions.jsonl", "w") as caps, open(tmp / "labels.jsonl", "w") as labs:
            for i in range(n):
                image, text, labels = make_sample(seed, i, size)
                name = f"images/{i:06d}.png"
                image.save(tmp / name)
                (tmp / name).with_suffix(".txt").write_text(text + "\n")
                caps.write(json.dumps({"path": name, "caption": text}) + "\n")
                labs.write(json.dumps({"path": name, **labels}) + "\n")
        (tmp / "info.json").write_text(
            json.dumps(
                {
                    "generator": "aimv2 data shapes",
                    "n": n,
                    "size": size,
                    "seed": seed,
                    "attributes": ATTRIBUTES,
                },
                indent=2,
            )
        )
    return out


def read_labels(folder: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
    """Image paths (relative) and, per attribute, integer labels indexing `ATTRIBUTES[attr]`."""
    rows = [
        json.loads(line) for line in Path(folder, "labels.jsonl").read_text().splitlines() if line
    ]
    labels = {a: np.array([ATTRIBUTES[a].index(r[a]) for r in rows]) for a in ATTRIBUTES}
    return [r["path"] for r in rows], labels
