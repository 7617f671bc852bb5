"""Drawing helpers shared by the generated data sets (`demo_scenes`, `scenes_drawing`).

Each generated source draws its own backdrop and tokens; what they do alike
lives here once: the uniform random choice (`pick`), the anti-aliased mask of a
token's polygons (`token_mask`), the sensor grain that ends every picture
(`add_grain`), the JPEG encoding (`jpeg_bytes`) and the polygon area of an
instance annotation (`polygon_area`). Every random draw comes from the
generator passed in, so a seeded generator gives the same picture everywhere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

T = TypeVar("T")


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One of `options`, uniformly: the one kind of random choice the scenes and captions make."""
    return options[int(rng.integers(len(options)))]


def token_mask(
    polygons: Sequence[np.ndarray], pad: int, width: int, height: int, supersample: int
) -> tuple[tuple[int, int, int, int], Image.Image]:
    """((x0, y0, x1, y1), mask): the token's padded box in the picture and its coverage there.

    The first polygon [m, 2] is the outline, later ones are holes. The mask is
    an "L" image of the box's size, drawn `supersample` times larger and
    reduced, so its edge is anti-aliased (a box filter).
    """
    outline = polygons[0]
    x0, y0 = np.maximum(np.floor(outline.min(0)).astype(int) - pad, 0)
    x1, y1 = np.minimum(np.ceil(outline.max(0)).astype(int) + pad, (width, height))
    mask = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    draw = ImageDraw.Draw(mask)
    for n, polygon in enumerate(polygons):
        shifted = [((x - x0) * supersample, (y - y0) * supersample) for x, y in polygon]
        draw.polygon(shifted, fill=0 if n else 255)
    return (x0, y0, x1, y1), mask.reduce(supersample)


def add_grain(img: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """The float picture with sensor-like grain of a strength in [low, high), as uint8."""
    # Uniform noise looks the same as normal noise here and draws about 4x faster.
    img += rng.uniform(low, high) * (rng.random(img.shape, dtype=np.float32) - 0.5)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    """The picture as a quality-90 JPEG file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def polygon_area(points: np.ndarray) -> float:
    """Area inside the polygon [m, 2] (shoelace formula), in square pixels."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)
