"""InceptionV3 input from an image: the one preprocessing for features, reports and serving.

Pixels come from `captioning.data.images.decode_image` (every Pillow format, EXIF
orientation applied, pixel bound checked); this module resizes them to the
extractor's square input and scales them to [-1, 1] the way InceptionV3 was
trained. `load_image` is the same chain as a graph op, for tf.data.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioning.data.images import DEFAULT_MAX_PIXELS, decode_image

IMAGE_SIZE = 299  # InceptionV3's input side; params.yaml features.image_size


def preprocess_pixels(pixels: np.ndarray | tf.Tensor, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """(h, w, 3) uint8 RGB -> (image_size, image_size, 3) float32 in [-1, 1]; graph-safe."""
    image = tf.image.resize(pixels, (image_size, image_size), method="bilinear")  # (S, S, 3)
    return keras.applications.inception_v3.preprocess_input(image)  # (S, S, 3) in [-1, 1]


def preprocess_image(
    source: bytes | str | Path,
    image_size: int = IMAGE_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> tf.Tensor:
    """Encoded image bytes or a file -> (image_size, image_size, 3) float32 in [-1, 1].

    Raises `captioning.data.images.ImageReadError` for anything that is not a readable image.
    """
    return preprocess_pixels(decode_image(source, max_pixels, name), image_size)


def load_image(
    path: tf.Tensor, image_size: int = IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tf.Tensor:
    """A file path tensor -> preprocessed image, inside tf.data (decoding runs in Python)."""

    def read(file_name: bytes) -> np.ndarray:
        return decode_image(file_name.decode("utf-8"), max_pixels)

    pixels = tf.numpy_function(read, [path], tf.uint8, stateful=False)  # (h, w, 3)
    pixels.set_shape([None, None, 3])
    return preprocess_pixels(pixels, image_size)
