"""The registered captioner as a TensorFlow SavedModel, for TF Serving and non-Python runtimes.

`export_savedmodel` writes one SavedModel (Keras' `ExportArchive`, the machinery
behind `model.export`) holding the InceptionV3 extractor, the encoder and the
decoder, with greedy decoding compiled into the graph. It has two endpoints:

- `serving_default` (alias of `caption_images`): encoded images, a string
  tensor (N,) of JPEG/PNG/GIF/BMP bytes, decoded by TensorFlow's own decoders
  (which apply no EXIF rotation and read only those four formats, unlike the
  project's Python reader) and resized in the graph;
- `caption_pixels`: decoded RGB pixels, uint8 (N, H, W, 3), any H and W shared
  by the batch; the same resize and scaling as `captioning.features.preprocessing`,
  so it captions exactly like `ImageCaptioner` with `method="greedy"`.

Both return `tokens` int32 (N, max_len) (<end> then <pad> after the caption),
`captions` string (N,) (the vocabulary's words up to <end>) and `scores`
float32 (N,) (summed log-probabilities). Beam search, sampling and request
bounds stay in the MLflow pyfunc model; this export is for runtimes without
Python.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from captioning.atomic_files import atomic_directory
from captioning.data.images import DEFAULT_MAX_PIXELS
from captioning.data.text import END_ID, PAD_ID, START_ID
from captioning.features.preprocessing import preprocess_pixels
from captioning.serving.inference import ImageCaptioner


def _token_text(tokens: tf.Tensor, words: tf.Tensor) -> tf.Tensor:
    """(N, T) int32 ids -> (N,) strings: `Vocabulary.decode` as graph ops."""
    ended = tf.cumsum(tf.cast(tf.equal(tokens, END_ID), tf.int32), axis=1) > 0  # (N, T)
    keep = ~ended & tf.not_equal(tokens, PAD_ID) & tf.not_equal(tokens, START_ID)
    chosen = tf.ragged.boolean_mask(tf.gather(words, tokens), keep)  # (N, None)
    return tf.strings.reduce_join(chosen, axis=1, separator=" ")


def export_savedmodel(
    model_path: str | Path,
    out_dir: str | Path,
    max_len: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Path:
    """Export the .keras captioner at `model_path` with its extractor to the SavedModel `out_dir`.

    `max_len` bounds every caption (the serving config's `max_length`). The
    folder is written whole (staged, then renamed); returns `out_dir`.
    """
    captioner = ImageCaptioner(model_path, max_pixels=max_pixels)
    size = captioner.image_size
    words = tf.constant(list(captioner.model.vocabulary.words))
    decoder = captioner.decoder

    def caption(inputs: tf.Tensor) -> dict[str, tf.Tensor]:  # (N, S, S, 3) in [-1, 1]
        features = captioner.extractor(inputs, training=False)  # (N, L, 2048)
        tokens, scores = decoder.greedy_tokens(features, max_len)
        return {"tokens": tokens, "captions": _token_text(tokens, words), "scores": scores}

    def caption_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return caption(preprocess_pixels(pixels, size))  # (N, H, W, 3) -> (N, S, S, 3)

    def read(data: tf.Tensor) -> tf.Tensor:
        pixels = tf.io.decode_image(data, channels=3, expand_animations=False)  # (h, w, 3)
        return preprocess_pixels(pixels, size)

    def caption_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        spec = tf.TensorSpec([size, size, 3], tf.float32)
        return caption(tf.map_fn(read, images, fn_output_signature=spec))

    archive = keras.export.ExportArchive()
    archive.track(captioner.extractor)
    archive.track(captioner.model)
    # The first endpoint is also `serving_default`, the one TF Serving calls.
    archive.add_endpoint(
        "caption_images", caption_images, [tf.TensorSpec([None], tf.string, name="images")]
    )
    archive.add_endpoint(
        "caption_pixels",
        caption_pixels,
        [tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")],
    )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staged:
        archive.write_out(str(staged), verbose=False)
    return out_dir
