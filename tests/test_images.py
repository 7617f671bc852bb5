"""The one image reader: high-bit-depth images scaled to 8 bits, degenerate shapes refused.

Every 8-bit mode must read exactly as Pillow's `convert("RGB")` reads it (the
pipeline's features depend on it); 16-bit greyscale PNG and TIFF, 32-bit
integer and float images are scaled, not clipped to white; a side under
`min_side` or a side ratio over `max_aspect` is refused from the header with a
reason validate writes into its quarantine.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioning.config import ValidateParams
from captioning.data.images import REASONS, ImageReadError, decode_image, image_size
from captioning.data.validation import check_images


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def ramp16(height: int = 24, width: int = 40) -> np.ndarray:
    """A 16-bit greyscale ramp over the whole range, (height, width) uint16."""
    return np.linspace(0, 65535, height * width).reshape(height, width).astype(np.uint16)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr"])
def test_8_bit_images_read_exactly_as_pillow_converts_them(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "TIFF" if mode == "LA" else "PNG"
    data = encode(image, fmt)
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(decode_image(data), expected)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(fmt):
    values = ramp16()
    data = encode(Image.fromarray(values), fmt)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I;16")
        clipped = np.asarray(image.convert("RGB"))  # what `convert` alone gives: nearly all white
        assert (clipped == 255).mean() > 0.99
    pixels = decode_image(data)  # (24, 40, 3)
    expected = np.rint(values / 257).astype(np.uint8)
    assert pixels.shape == (24, 40, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[..., 0], expected)
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    assert (pixels.min(), pixels.max()) == (0, 255)


def test_32_bit_integer_and_float_images_are_scaled():
    values = ramp16().astype(np.int32)
    as_int = decode_image(encode(Image.fromarray(values, "I"), "TIFF"))
    np.testing.assert_array_equal(as_int[..., 0], np.rint(values / 257).astype(np.uint8))
    unit = np.linspace(0, 1, 24 * 40, dtype=np.float32).reshape(24, 40)
    as_float = decode_image(encode(Image.fromarray(unit, "F"), "TIFF"))
    np.testing.assert_array_equal(as_float[..., 1], np.rint(unit * 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("size", "reason", "message"),
    [
        ((1, 1), "too_small", "1x1 is too small: the shorter side must be at least 16 pixels"),
        ((100, 15), "too_small", "100x15 is too small"),
        ((10_000, 20), "bad_aspect", "10000x20 has an aspect ratio of 500.0:1; at most 10:1"),
        ((20, 201), "bad_aspect", "aspect ratio of 10.1:1"),
    ],
)
def test_degenerate_shapes_are_refused_from_the_header(size, reason, message):
    data = encode(Image.new("L", size))
    with pytest.raises(ImageReadError) as err:
        image_size(data, "tiny.png", min_side=16, max_aspect=10)
    assert err.value.reason == reason and reason in REASONS
    assert str(err.value) == f"tiny.png: {err.value.detail}" and message in str(err.value)
    with pytest.raises(ImageReadError, match=message.split(":")[0]):
        decode_image(data, min_side=16, max_aspect=10)
    assert decode_image(data).shape == (size[1], size[0], 3)  # the bounds are off unless asked


def test_validate_quarantines_degenerate_shapes_with_the_reason(tmp_path):
    params = ValidateParams()
    rows = []
    for image_id, size in enumerate([(64, 48), (1, 1), (2000, 20), (16, 160)], start=1):
        path = tmp_path / f"{image_id}.png"
        path.write_bytes(encode(Image.new("RGB", size, (9, 9, 9))))
        rows.append({"image_id": image_id, "path": str(path), "caption": "a grey picture"})
    clean, quarantine = check_images(
        pd.DataFrame(rows),
        params.max_pixels,
        min_side=params.min_side,
        max_aspect=params.max_aspect,
    )
    assert clean["image_id"].tolist() == [1, 4]  # 16x160 is exactly 10:1
    assert [(q["image_id"], q["reason"]) for q in quarantine] == [
        (2, "too_small"),
        (3, "bad_aspect"),
    ]
    assert "at least 16 pixels" in quarantine[0]["detail"]
