"""The served captioner: an MLflow pyfunc model that turns raw image bytes into captions.

`CaptionerModel` is what `mlflow models serve` loads. Its `load_context` loads
the trained `.keras` captioner and hands it to `captioning.serving.inference.ImageCaptioner`,
which rebuilds the InceptionV3 extractor the model was trained with (seeded
random weights, or a weights file logged beside the model) and checks its
digest. Its `predict` takes base64-encoded images in any format Pillow reads
(JPEG, PNG, WebP, BMP, GIF, TIFF, ...), checks every request before any pixel
is decoded (`captioning.serving.request_checks`: base64 alphabet, size, and the
pixel count and shape from the image header), then reads them with the project's one image reader (EXIF orientation
applied) and preprocessing, within a process-wide budget of pixels decoded at
once. A bad request raises `MlflowException(INVALID_PARAMETER_VALUE)`, which the
scoring server answers with HTTP 400 and the message, and keeps serving; under
`mlflow models serve`, `captioning.serving.http_guard` bounds the request
itself (size, Content-Type, concurrency) and keeps error replies short. `log_captioner_model` logs it as a model from code (`served_model.py`,
so loading it unpickles nothing) with a signature, an input example, pinned
requirements and this package's code.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

import captioning
from captioning.data.images import ImageReadError
from captioning.features import imagenet_weights_path
from captioning.features.extraction import _file_digest
from captioning.model.captioner import load_captioner
from captioning.model.decode import DecodeResult
from captioning.serving.http_guard import install_in_scoring_server
from captioning.serving.inference import ImageCaptioner, PixelBudget
from captioning.serving.request_checks import (  # noqa: F401 - served names, imported from here too
    DECODERS,
    IMAGE_COLUMN,
    MAX_BEAM_SIZE,
    MAX_LENGTH,
    ServingConfig,
    bad_request,
    decode_base64_image,
    decoding_settings,
    request_images,
)

EXTRACTOR_ARTIFACT = "extractor_weights"
CAPTIONER_ARTIFACT = "captioner"
# The models-from-code file MLflow runs to build `CaptionerModel` on load.
MODEL_CODE = Path(__file__).with_name("served_model.py")
# What `import captioning.serving.pyfunc` and the model's own code need at serve time.
PINNED_DISTRIBUTIONS = (
    ("tensorflow-cpu", "tensorflow"),  # either distribution provides `tensorflow`
    ("keras",),
    ("mlflow",),
    ("pillow",),
    ("numpy",),
    ("pandas",),
    ("tqdm",),
)


# ----------------------------------------------------------------------------- the model

# The captioner this process loaded last, by serving config and artifact contents.
# Spark's local mode loads the pyfunc once per task (MLflow's per-executor model
# cache is for clusters only); with Python workers reused, each loads it once.
_LOADED: dict[tuple, ImageCaptioner] = {}


class CaptionerModel(mlflow.pyfunc.PythonModel):
    """Raw images (base64, any format Pillow reads) -> caption, score, optionally attention."""

    def load_context(self, context):
        self.config = ServingConfig.from_dict(context.model_config)
        install_in_scoring_server(
            self.config.max_request_bytes, self.config.max_concurrent_requests
        )
        artifacts = context.artifacts
        key = (self.config, *(_file_digest(artifacts[n]) if artifacts.get(n) else None
                              for n in (CAPTIONER_ARTIFACT, EXTRACTOR_ARTIFACT)))  # fmt: skip
        if key not in _LOADED:
            _LOADED.clear()  # one model per process: a new version replaces the old
            _LOADED[key] = self._build_captioner(artifacts)
        self.captioner = _LOADED[key]
        self.vocabulary = self.captioner.model.vocabulary

    def _build_captioner(self, artifacts: dict[str, str]) -> ImageCaptioner:
        model = load_captioner(artifacts[CAPTIONER_ARTIFACT])
        weights = artifacts.get(EXTRACTOR_ARTIFACT)
        if weights:
            # The extractor weights travel with the model; point the config at
            # this copy so ImageCaptioner rebuilds from it and checks its digest.
            model.model_config = dataclasses.replace(model.model_config, extractor_weights=weights)
        captioner = ImageCaptioner(
            model,
            max_pixels=self.config.max_pixels,
            min_side=self.config.min_side,
            max_aspect=self.config.max_aspect,
            decode_budget=PixelBudget(self.config.decode_budget_pixels),
        )
        # Trace the extractor and the greedy loop now, not on the first request.
        captioner.caption_bytes([example_image_bytes()], method="greedy", max_len=2)
        return captioner

    # pd.DataFrame: what the scoring server passes after schema enforcement; the
    # hint also tells MLflow not to infer a signature from it (ours is explicit).
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per image: caption, score, and with return_attention words + attention."""
        settings = decoding_settings(params, self.config)
        values = request_images(model_input, self.config.max_batch)
        names = [f"image {i}" for i in range(len(values))]
        images = [
            decode_base64_image(value, name, self.config)
            for value, name in zip(values, names, strict=True)
        ]
        try:
            result = self.captioner.caption_bytes(
                images,
                names,
                method=settings["decoder"],
                max_len=settings["max_length"],
                beam_size=settings["beam_size"],
                length_penalty=float(settings["length_penalty"]),
                temperature=float(settings["temperature"]),
                batch_size=self.config.max_batch,
            )
        except ImageReadError as err:  # the header was fine, the pixels are not
            raise bad_request(str(err)) from None
        return pd.DataFrame(self.response_rows(result, settings["return_attention"]))

    def response_rows(self, result: DecodeResult, with_attention: bool) -> list[dict[str, Any]]:
        """The response rows of a decoded batch."""
        rows = []
        for i, caption in enumerate(result.captions):
            row = {"caption": caption, "score": float(result.scores[i])}
            if with_attention:
                n = int(result.lengths[i])
                row["words"] = [self.vocabulary.words[t] for t in result.tokens[i, :n]]
                row["attention"] = np.round(result.attention_for(i), 6).tolist()  # (words, L)
            rows.append(row)
        return rows


# ----------------------------------------------------------------------------- logging


def example_image_bytes(size: int = 64) -> bytes:
    """A small, valid PNG (a colour gradient): the input example and the warm-up image."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))],
        axis=-1,
    ).astype(np.uint8)  # (size, size, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def pinned_requirements() -> list[str]:
    """`name==version` of the installed serving dependencies."""
    pins = []
    for alternatives in PINNED_DISTRIBUTIONS:
        for dist in alternatives:
            try:
                pins.append(f"{dist}=={importlib.metadata.version(dist)}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            raise RuntimeError(f"none of {alternatives} is installed")
    return pins


def captioner_signature(config: ServingConfig) -> ModelSignature:
    """One string column of base64 images in; caption + score (+ words, attention) out."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec("string", "caption"),
                ColSpec("double", "score"),
                ColSpec(Array("string"), "words", required=False),
                ColSpec(Array(Array("double")), "attention", required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("decoder", "string", config.decoder),
                ParamSpec("beam_size", "long", config.beam_size),
                ParamSpec("length_penalty", "double", float(config.length_penalty)),
                ParamSpec("max_length", "long", config.max_length),
                ParamSpec("temperature", "double", float(config.temperature)),
                ParamSpec("return_attention", "boolean", False),
            ]
        ),
    )


def extractor_weights_file(extractor_weights: str) -> Path | None:
    """The file to ship for the model's extractor; None when it is rebuilt from a seed."""
    key = extractor_weights.strip()
    if key.lower() == "none":
        return None
    if key.lower() == "imagenet":
        return imagenet_weights_path()  # from the keras cache: the server may be offline
    return Path(key).expanduser()


def captioner_model_kwargs(model_path: str | Path, config: ServingConfig) -> dict[str, Any]:
    """Everything `mlflow.pyfunc.log_model` / `save_model` need for the captioner.

    The model is `served_model.py` (models from code: MLflow copies the file
    and runs it on load), with this package's code beside it so `captioning`
    imports wherever the model is loaded. Ships the `.keras` file and the
    extractor weights when they are a file as artifacts, the serving settings
    as `model_config`, the signature, an input example, and pins the
    installed versions of the serving dependencies.
    """
    model_config = load_captioner(str(model_path)).model_config
    artifacts = {CAPTIONER_ARTIFACT: str(model_path)}
    weights = extractor_weights_file(model_config.extractor_weights)
    if weights is not None:
        artifacts[EXTRACTOR_ARTIFACT] = str(weights)
    example = pd.DataFrame(
        {IMAGE_COLUMN: [base64.b64encode(example_image_bytes()).decode("ascii")]}
    )
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": artifacts,
        "model_config": dataclasses.asdict(config),
        "signature": captioner_signature(config),
        "input_example": (example, {"decoder": config.decoder}),
        "pip_requirements": pinned_requirements(),
        "code_paths": [str(Path(captioning.__file__).parent)],
        "metadata": {"captioning_version": captioning.__version__},
    }


def log_captioner_model(
    model_path: str | Path,
    config: ServingConfig,
    name: str = "captioner",
    tags: dict[str, str] | None = None,
):
    """Log the pyfunc captioner to the active MLflow run; returns its `ModelInfo`."""
    return mlflow.pyfunc.log_model(
        name=name, tags=tags, **captioner_model_kwargs(model_path, config)
    )
