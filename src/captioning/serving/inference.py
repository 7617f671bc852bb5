"""Captions for image files or bytes: extractor + captioner + decoder in one object.

`ImageCaptioner` is what people and servers use: `captioning caption` and the
MLflow pyfunc model both call it. It rebuilds the InceptionV3 extractor the
model's features were made with (recorded in the model's config, with a digest
checked so a different extractor cannot silently produce nonsense), reads
images with the project's one image reader and preprocessing (any format
Pillow reads, EXIF orientation applied, pixel count bounded), and decodes in
batches. An image that cannot be read raises `captioning.data.images.ImageReadError`
naming it and saying why. Given a `PixelBudget`, the captioner decodes an
image only while the pixels being decoded by all threads stay within it, so a
server's decoding memory is bounded however many requests arrive at once.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tensorflow as tf

from captioning.config import DecoderMethod, EvaluateParams, FeaturesParams
from captioning.data.images import DEFAULT_MAX_PIXELS, ImageReadError, image_size
from captioning.features import build_extractor, weights_digest
from captioning.features.preprocessing import preprocess_image
from captioning.model.captioner import Captioner, load_captioner
from captioning.model.decode import CaptionDecoder, DecodeResult


class PixelBudget:
    """At most `pixels` pixels decoded at once across threads; a larger image waits to go alone."""

    def __init__(self, pixels: int):
        self.pixels = pixels
        self.in_use = 0
        self._free = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        """Block until `pixels` (capped at the budget) fit, hold them for the block."""
        want = min(pixels, self.pixels)
        with self._free:
            self._free.wait_for(lambda: self.in_use + want <= self.pixels)
            self.in_use += want
        try:
            yield
        finally:
            with self._free:
                self.in_use -= want
                self._free.notify_all()


class ImageCaptioner:
    """Caption raw images with a trained captioner and its extractor.

    `min_side`/`max_aspect` refuse degenerate shapes (off by default; the served
    model passes params.yaml's); `decode_budget` bounds pixels decoded at once.
    """

    def __init__(
        self,
        model: Captioner | str | Path,
        extractor=None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = 1,
        max_aspect: float | None = None,
        decode_budget: PixelBudget | None = None,
    ):
        self.model = model if isinstance(model, Captioner) else load_captioner(str(model))
        config = self.model.model_config
        if extractor is None:
            extractor = build_extractor(
                config.extractor_weights, config.image_size, config.extractor_seed
            )
            digest = weights_digest(extractor)
            if config.extractor_digest and digest != config.extractor_digest:
                raise ValueError(
                    f"the rebuilt extractor ({config.extractor_weights!r}, seed "
                    f"{config.extractor_seed}) is not the one the model was trained on: "
                    f"digest {digest[:12]} != {config.extractor_digest[:12]}"
                )
        self.extractor = extractor
        self.image_size = config.image_size
        self.max_pixels = max_pixels
        self.min_side, self.max_aspect = min_side, max_aspect
        self.decode_budget = decode_budget
        self.decoder = CaptionDecoder(self.model)
        self._forward = tf.function(lambda x: self.extractor(x, training=False))

    def preprocess(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """Decode and resize every image; (N, S, S, 3) float32. Bad images raise ImageReadError."""
        names = names or [f"image {i}" for i in range(len(images))]
        out = np.zeros((len(images), self.image_size, self.image_size, 3), np.float32)
        for i, (data, name) in enumerate(zip(images, names, strict=True)):
            _, width, height = image_size(
                data, name, self.max_pixels, self.min_side, self.max_aspect
            )
            if self.decode_budget is None:
                out[i] = preprocess_image(data, self.image_size, self.max_pixels, name).numpy()
                continue
            with self.decode_budget.hold(width * height):
                out[i] = preprocess_image(data, self.image_size, self.max_pixels, name).numpy()
        return out

    def features(
        self, pixels: np.ndarray, batch_size: int = FeaturesParams.batch_size
    ) -> np.ndarray:
        """(N, S, S, 3) -> (N, L, 2048) float32."""
        parts = [
            self._forward(tf.convert_to_tensor(pixels[i : i + batch_size])).numpy()
            for i in range(0, len(pixels), batch_size)
        ]
        if not parts:
            config = self.model.model_config
            return np.zeros((0, config.num_locations, config.feature_dim), np.float32)
        return np.concatenate(parts)

    def caption_bytes(
        self,
        images: Sequence[bytes],
        names: Sequence[str] | None = None,
        method: DecoderMethod = EvaluateParams.decoder,
        max_len: int = EvaluateParams.max_len,
        beam_size: int = EvaluateParams.beam_size,
        batch_size: int = FeaturesParams.batch_size,
        **kwargs,
    ) -> DecodeResult:
        """Captions for encoded images (bytes of any format Pillow reads)."""
        features = self.features(self.preprocess(images, names), batch_size)
        return self.decoder.decode(
            features,
            method=method,
            max_len=max_len,
            beam_size=beam_size,
            batch_size=batch_size,
            **kwargs,
        )

    def caption_files(self, paths: Sequence[str | Path], **kwargs) -> DecodeResult:
        """Captions for image files; a missing or unreadable file raises ImageReadError."""
        data = []
        for path in paths:
            try:
                data.append(Path(path).read_bytes())
            except OSError as err:
                raise ImageReadError(
                    str(path), "missing_file", f"cannot read ({err.strerror})"
                ) from None
        return self.caption_bytes(data, [str(p) for p in paths], **kwargs)
