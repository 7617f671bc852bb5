"""The one image reader: bytes or a file -> upright RGB pixels, or a clear reason why not.

Validation, feature extraction, reports and the served model all read images
here, so an image that trains is an image that serves, and the same way up:
- every format Pillow decodes (JPEG, PNG, WebP, BMP, GIF, TIFF, ...), sniffed
  from the content, not the file name; an animation gives its first frame;
- the EXIF orientation tag applied (a phone photo stored sideways with
  "rotate 90" is read upright);
- the pixel count checked against `max_pixels` from the header, before any
  pixel is decoded (decompression bombs), and, where the caller asks, the
  shorter side against `min_side` and the longer/shorter ratio against
  `max_aspect` (a 1x1 or 10000x10 picture says nothing at 299x299);
- high-bit-depth pixels (16-bit greyscale PNG/TIFF, 32-bit integer or float
  images) scaled to 8 bits, not clipped; 8-bit images are read exactly as
  Pillow's `convert("RGB")` reads them;
- any decoder failure raised as `ImageReadError` with a short `reason` code
  (the quarantine report's vocabulary) and a message naming the image.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioning.config import DEFAULT_MAX_PIXELS

REASONS = (
    "empty_file",
    "missing_file",
    "too_large",
    "too_small",
    "bad_aspect",
    "undecodable",
    "truncated",
    "decode_error",
)
# Modes Pillow gives high-bit-depth single-channel images; `convert("RGB")` clips them at 255.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageReadError(ValueError):
    """An image cannot be read; `reason` is one of REASONS, the message says which image and why."""

    def __init__(self, name: str, reason: str, detail: str):
        super().__init__(f"{name}: {detail}")
        self.name = name
        self.reason = reason
        self.detail = detail


def _open_source(source: bytes | str | Path) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "image"
    path = Path(source)
    try:
        return path.read_bytes(), path.name
    except FileNotFoundError:
        raise ImageReadError(path.name, "missing_file", "file not found") from None
    except OSError as err:  # a folder, no permission, an I/O error
        raise ImageReadError(path.name, "decode_error", f"cannot read the file ({err})") from None


def image_size(
    data: bytes,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    max_aspect: float | None = None,
) -> tuple[str, int, int]:
    """(format, width, height) from the header alone, after the emptiness, pixel and shape checks.

    Width and height are as stored; EXIF rotation may swap them when decoded
    (neither the shorter side nor the aspect ratio changes). `min_side` and
    `max_aspect` are off unless given: validate and serving pass theirs from params.yaml.
    """
    if not data:
        raise ImageReadError(name, "empty_file", "empty input (0 bytes)")
    try:
        # `max_pixels` below decides. Pillow only warns between its own bound and twice
        # it; the warning is left alone because filtering warnings is not thread-safe
        # and tf.data decodes on several threads.
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError as err:  # Pillow refuses over twice its bound at open
        bound = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
        raise ImageReadError(
            name, "too_large", f"exceeds the bound of {bound} pixels ({err})"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(
            name,
            "undecodable",
            f"not an image format Pillow reads ({len(data)} bytes starting {data[:8]!r})",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else "decode_error"
        raise ImageReadError(name, reason, f"unreadable header ({err})") from None
    if width * height > max_pixels:
        raise ImageReadError(
            name,
            "too_large",
            f"{width}x{height} = {width * height} pixels exceeds the bound of {max_pixels} "
            "pixels (decompression bomb guard)",
        )
    if width <= 0 or height <= 0:
        raise ImageReadError(name, "decode_error", f"header size {width}x{height}")
    check_shape(name, width, height, min_side, max_aspect)
    return fmt, width, height


def check_shape(
    name: str, width: int, height: int, min_side: int, max_aspect: float | None
) -> None:
    """Refuse a shorter side under `min_side` or a side ratio over `max_aspect`."""
    short, long = min(width, height), max(width, height)
    if short < min_side:
        raise ImageReadError(
            name,
            "too_small",
            f"{width}x{height} is too small: the shorter side must be at least {min_side} pixels",
        )
    if max_aspect is not None and long > max_aspect * short:
        raise ImageReadError(
            name,
            "bad_aspect",
            f"{width}x{height} has an aspect ratio of {long / short:.1f}:1; "
            f"at most {max_aspect:g}:1 is accepted",
        )


def to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> (H, W, 3) uint8; high-bit-depth values are scaled, not clipped."""
    if image.mode not in _WIDE_MODES:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    values = np.asarray(image)  # (H, W) uint16 / int32 / float32
    if image.mode == "F" and values.size and np.nanmin(values) >= 0 and np.nanmax(values) <= 1:
        scaled = values * 255.0  # float images in [0, 1]
    elif image.mode.startswith("I;16"):
        scaled = values * (255.0 / 65535.0)
    else:  # "I" or "F" of any range: 16-bit when it fits, else its own maximum
        top = float(np.nanmax(values)) if values.size else 0.0
        scaled = values * (255.0 / (65535.0 if 255 < top <= 65535 else max(top, 255.0)))
    grey = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)  # (H, W)
    return np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)


def decode_image(
    source: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    min_side: int = 1,
    max_aspect: float | None = None,
) -> np.ndarray:
    """Encoded image bytes or a file path -> (height, width, 3) uint8 RGB, EXIF orientation applied."""
    data, default_name = _open_source(source)
    name = name or default_name
    fmt, _, _ = image_size(data, name, max_pixels, min_side, max_aspect)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            pixels = to_rgb(upright)  # (H, W, 3) uint8
    except (EOFError, OSError) as err:
        message = str(err)
        if isinstance(err, EOFError) or "truncated" in message.lower():
            raise ImageReadError(
                name, "truncated", f"a truncated or corrupt {fmt} ({len(data)} bytes: {message})"
            ) from None
        raise ImageReadError(name, "decode_error", f"{type(err).__name__}: {message}") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure means "cannot use this image"
        message = str(err).replace(os.sep, "/")
        raise ImageReadError(name, "decode_error", f"{type(err).__name__}: {message}") from None
    return np.ascontiguousarray(pixels)
