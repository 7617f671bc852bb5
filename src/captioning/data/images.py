"""The one image reader: bytes or a file -> upright RGB pixels, or a clear reason why not.

Validation, feature extraction, reports and the served model all read images
here, so an image that trains is an image that serves, and the same way up:
- every format Pillow decodes (JPEG, PNG, WebP, BMP, GIF, TIFF, ...), sniffed
  from the content, not the file name; an animation gives its first frame;
- the EXIF orientation tag applied (a phone photo stored sideways with
  "rotate 90" is read upright);
- the pixel count checked against `max_pixels` from the header, before any
  pixel is decoded (decompression bombs);
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

REASONS = ("empty_file", "missing_file", "too_large", "undecodable", "truncated", "decode_error")


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
    data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[str, int, int]:
    """(format, width, height) from the header alone, after the emptiness and pixel-bound checks.

    Width and height are as stored; EXIF rotation may swap them when decoded.
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
    return fmt, width, height


def decode_image(
    source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> np.ndarray:
    """Encoded image bytes or a file path -> (height, width, 3) uint8 RGB, EXIF orientation applied."""
    data, default_name = _open_source(source)
    name = name or default_name
    fmt, _, _ = image_size(data, name, max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            pixels = np.asarray(upright.convert("RGB"))  # (H, W, 3) uint8
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
