"""What the served captioner accepts: its serving settings and the checks every request passes.

`ServingConfig` (decoding defaults and request bounds, the pyfunc's
`model_config`) and the checks `CaptionerModel.predict` runs before any pixel
is decoded: the batch's shape and size, strict base64, the image's byte size,
pixel count and shape from its header, and the decoding params. A failed
check raises `MlflowException(INVALID_PARAMETER_VALUE)` (HTTP 400 under the
scoring server). It imports no TensorFlow, so the Spark batch job checks its
images with it in a Python worker that never loads the model.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from captioning.config import EvaluateParams, RegisterParams
from captioning.data.images import ImageReadError, image_size

IMAGE_COLUMN = "image"
DECODERS = ("greedy", "sample", "beam")
# Hard caps on request-controlled work: decoding cost grows with both.
MAX_BEAM_SIZE = 16
MAX_LENGTH = 64


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
