"""The served captioner: an MLflow pyfunc model that turns raw image bytes into captions.

`CaptionerModel` is what `mlflow models serve` loads. Its `load_context` loads
the trained `.keras` captioner and hands it to `captioning.serving.inference.ImageCaptioner`,
which rebuilds the InceptionV3 extractor the model was trained with (seeded
random weights, or a weights file logged beside the model) and checks its
digest. Its `predict` takes base64-encoded images in any format Pillow reads
(JPEG, PNG, WebP, BMP, GIF, TIFF, ...), checks every request before any pixel
is decoded (base64 alphabet, size, and the pixel count and shape from the image
header), then reads them with the project's one image reader (EXIF orientation
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
import binascii
import dataclasses
import importlib.metadata
import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

import captioning
from captioning.config import EvaluateParams, RegisterParams
from captioning.data.images import ImageReadError, image_size
from captioning.features import imagenet_weights_path
from captioning.model.captioner import load_captioner
from captioning.model.decode import DecodeResult
from captioning.serving.http_guard import install_in_scoring_server
from captioning.serving.inference import ImageCaptioner, PixelBudget

IMAGE_COLUMN = "image"
DECODERS = ("greedy", "sample", "beam")
# Hard caps on request-controlled work: decoding cost grows with both.
MAX_BEAM_SIZE = 16
MAX_LENGTH = 64
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


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Decoding defaults and request bounds; travels as the pyfunc `model_config`."""

    decoder: str = EvaluateParams.decoder
    beam_size: int = EvaluateParams.beam_size
    length_penalty: float = EvaluateParams.length_penalty
    max_length: int = EvaluateParams.max_len
    temperature: float = EvaluateParams.temperature
    max_batch: int = RegisterParams.max_batch
    max_pixels: int = RegisterParams.max_pixels
    min_side: int = RegisterParams.min_side
    max_aspect: float = RegisterParams.max_aspect
    max_request_bytes: int = RegisterParams.max_request_bytes
    max_concurrent_requests: int = RegisterParams.max_concurrent_requests
    decode_budget_pixels: int = RegisterParams.decode_budget_pixels
    max_image_bytes: int = 20 * 1024 * 1024  # a phone photo is a few MB

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> ServingConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (raw or {}).items() if k in names})

    @classmethod
    def from_params(cls, evaluate: EvaluateParams, register: RegisterParams) -> ServingConfig:
        """Serve with the settings the model was evaluated with, under the register bounds."""
        return cls(
            decoder=evaluate.decoder,
            beam_size=evaluate.beam_size,
            length_penalty=evaluate.length_penalty,
            max_length=evaluate.max_len,
            temperature=evaluate.temperature,
            max_batch=register.max_batch,
            max_pixels=register.max_pixels,
            min_side=register.min_side,
            max_aspect=register.max_aspect,
            max_request_bytes=register.max_request_bytes,
            max_concurrent_requests=register.max_concurrent_requests,
            decode_budget_pixels=register.decode_budget_pixels,
        )


def bad_request(message: str) -> MlflowException:
    """The exception the scoring server turns into HTTP 400 with `message`."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# ----------------------------------------------------------------------------- request checks


def request_images(model_input: Any, max_batch: int) -> list[Any]:
    """The batch's image values from a DataFrame / Series / list / dict; checks count and shape."""
    if isinstance(model_input, pd.DataFrame):
        if list(model_input.columns) != [IMAGE_COLUMN]:
            raise bad_request(
                f"expected one column {IMAGE_COLUMN!r} of base64 strings, "
                f"got columns {[str(c) for c in model_input.columns]}"
            )
        values = model_input[IMAGE_COLUMN].tolist()
    elif isinstance(model_input, dict):
        if list(model_input) != [IMAGE_COLUMN]:
            raise bad_request(
                f"expected {{{IMAGE_COLUMN!r}: [base64 strings]}}, got keys {list(model_input)}"
            )
        values = model_input[IMAGE_COLUMN]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, pd.Series | np.ndarray | list | tuple):
        values = np.asarray(model_input, dtype=object).tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        raise bad_request(f"expected a list of base64 strings, got {type(model_input).__name__}")
    if not values:
        raise bad_request("empty batch: send at least one base64-encoded image")
    if len(values) > max_batch:
        raise bad_request(
            f"batch of {len(values)} images exceeds the maximum of {max_batch}; "
            f"send at most {max_batch} images per request"
        )
    return values


def decode_base64_image(value: Any, name: str, config: ServingConfig) -> bytes:
    """Strict base64 -> bytes of an image whose header passes the size bounds; nothing decoded."""
    if not isinstance(value, str):
        raise bad_request(
            f"{name}: expected a base64 string, got {type(value).__name__}"
            + (" (a nested list?)" if isinstance(value, list | np.ndarray) else "")
        )
    text = "".join(value.split())  # `base64` wraps lines; whitespace is not data
    if not text:
        raise bad_request(f"{name}: empty string; expected base64-encoded image bytes")
    # Refuse before decoding: base64 is 4 characters per 3 bytes.
    if len(text) > (config.max_image_bytes + 2) // 3 * 4:
        raise bad_request(
            f"{name}: about {len(text) * 3 // 4} bytes exceeds the limit of "
            f"{config.max_image_bytes} bytes per image"
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{name}: not valid base64 ({err})") from None
    try:
        image_size(data, name, config.max_pixels, config.min_side, config.max_aspect)
    except ImageReadError as err:
        raise bad_request(str(err)) from None
    return data


def decoding_settings(params: dict[str, Any] | None, config: ServingConfig) -> dict[str, Any]:
    """Request params merged over the model's defaults, range-checked."""
    params = dict(params or {})
    settings = {
        "decoder": params.get("decoder", config.decoder),
        "beam_size": params.get("beam_size", config.beam_size),
        "length_penalty": params.get("length_penalty", config.length_penalty),
        "max_length": params.get("max_length", config.max_length),
        "temperature": params.get("temperature", config.temperature),
        "return_attention": params.get("return_attention", False),
    }
    if settings["decoder"] not in DECODERS:
        raise bad_request(f"params.decoder={settings['decoder']!r}: use one of {list(DECODERS)}")
    for key, top in (("beam_size", MAX_BEAM_SIZE), ("max_length", MAX_LENGTH)):
        settings[key] = _bounded_int(key, settings[key], top)
    if not _is_number(settings["temperature"]) or settings["temperature"] <= 0:
        raise bad_request(
            f"params.temperature={settings['temperature']!r}: expected a positive number"
        )
    penalty = settings["length_penalty"]
    if not _is_number(penalty) or not 0 <= penalty <= 5:
        raise bad_request(f"params.length_penalty={penalty!r}: expected a number from 0 to 5")
    if not isinstance(settings["return_attention"], bool | np.bool_):
        raise bad_request(
            f"params.return_attention={settings['return_attention']!r}: expected true or false"
        )
    return settings


def _bounded_int(key: str, value: Any, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 1 <= value <= top:
        raise bad_request(f"params.{key}={value!r}: expected an integer from 1 to {top}")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- the model


class CaptionerModel(mlflow.pyfunc.PythonModel):
    """Raw images (base64, any format Pillow reads) -> caption, score, optionally attention."""

    def load_context(self, context):
        self.config = ServingConfig.from_dict(context.model_config)
        install_in_scoring_server(
            self.config.max_request_bytes, self.config.max_concurrent_requests
        )
        model = load_captioner(context.artifacts[CAPTIONER_ARTIFACT])
        weights = context.artifacts.get(EXTRACTOR_ARTIFACT)
        if weights:
            # The extractor weights travel with the model; point the config at
            # this copy so ImageCaptioner rebuilds from it and checks its digest.
            model.model_config = dataclasses.replace(model.model_config, extractor_weights=weights)
        self.captioner = ImageCaptioner(
            model,
            max_pixels=self.config.max_pixels,
            min_side=self.config.min_side,
            max_aspect=self.config.max_aspect,
            decode_budget=PixelBudget(self.config.decode_budget_pixels),
        )
        self.vocabulary = model.vocabulary
        # Trace the extractor and the greedy loop now, not on the first request.
        self.captioner.caption_bytes([example_image_bytes()], method="greedy", max_len=2)

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
