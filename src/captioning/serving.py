"""The served captioner: an MLflow pyfunc model that turns raw image bytes into captions.

`CaptionerModel` is what `mlflow models serve` loads. Its `load_context` loads
the trained `.keras` captioner and hands it to `captioning.inference.ImageCaptioner`,
which rebuilds the InceptionV3 extractor the model was trained with (seeded
random weights, or a weights file logged beside the model) and checks its
digest. Its `predict` takes base64-encoded JPEG/PNG bytes, validates every
request before any pixel is decoded (base64 alphabet, size, format and pixel
count read from the header), then runs the library's one preprocessing and
decoding. A bad request raises `MlflowException(INVALID_PARAMETER_VALUE)`,
which the scoring server answers with HTTP 400 and the message, and keeps
serving. `log_captioner_model` logs it with a signature, an input example,
pinned requirements and this package's code.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib.metadata
import io
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, UnidentifiedImageError

from captioning.config import EvaluateParams

IMAGE_COLUMN = "image"
ACCEPTED_FORMATS = ("JPEG", "PNG")
_MAGIC = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}
# TF prefixes op errors with the graph function's name; clients need only the reason.
_TF_OP_PREFIX = re.compile(r"\{\{function_node [^}]*\}\}\s*")
DECODERS = ("greedy", "sample", "beam")
# Hard caps on request-controlled work: decoding cost grows with both.
MAX_BEAM_SIZE = 16
MAX_LENGTH = 64
EXTRACTOR_ARTIFACT = "extractor_weights"
CAPTIONER_ARTIFACT = "captioner"
# What `import captioning.serving` and the model's own code need at serve time.
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
    max_batch: int = 16
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold
    max_image_bytes: int = 20 * 1024 * 1024

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> ServingConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (raw or {}).items() if k in names})


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
    """Strict base64 -> bytes of a JPEG/PNG whose header passes the size bounds."""
    if not isinstance(value, str):
        raise bad_request(
            f"{name}: expected a base64 string, got {type(value).__name__}"
            + (" (a nested list?)" if isinstance(value, list | np.ndarray) else "")
        )
    text = "".join(value.split())  # `base64` wraps lines; whitespace is not data
    if not text:
        raise bad_request(f"{name}: empty string; expected base64-encoded JPEG or PNG bytes")
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
    check_image_header(data, name, config.max_pixels)
    return data


def check_image_header(data: bytes, name: str, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) read from the header only; no pixel is decoded here."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError as err:  # Pillow refuses > 2x its own bound at open
        raise bad_request(
            f"{name}: image exceeds the bound of {max_pixels} pixels ({err})"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        for fmt, magic in _MAGIC.items():
            if data.startswith(magic):
                raise bad_request(
                    f"{name}: a truncated or corrupt {fmt} ({len(data)} bytes; header: {err})"
                ) from None
        raise bad_request(
            f"{name}: not a JPEG or PNG image ({len(data)} bytes starting {data[:8]!r})"
        ) from None
    if width * height > max_pixels:
        raise bad_request(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the bound of "
            f"{max_pixels} pixels (decompression bomb guard)"
        )
    return fmt, width, height


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
        value = settings[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | np.integer)
            or not 1 <= value <= top
        ):
            raise bad_request(f"params.{key}={value!r}: expected an integer from 1 to {top}")
        settings[key] = int(value)
    temperature = settings["temperature"]
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or temperature <= 0
    ):
        raise bad_request(f"params.temperature={temperature!r}: expected a positive number")
    penalty = settings["length_penalty"]
    if isinstance(penalty, bool) or not isinstance(penalty, int | float) or not 0 <= penalty <= 5:
        raise bad_request(f"params.length_penalty={penalty!r}: expected a number from 0 to 5")
    if not isinstance(settings["return_attention"], bool | np.bool_):
        raise bad_request(
            f"params.return_attention={settings['return_attention']!r}: expected true or false"
        )
    return settings


# ----------------------------------------------------------------------------- the model


class CaptionerModel(mlflow.pyfunc.PythonModel):
    """Raw images (base64 JPEG/PNG) -> caption, score and optionally per-word attention."""

    def load_context(self, context):
        from captioning.inference import ImageCaptioner
        from captioning.model import load_captioner

        self.config = ServingConfig.from_dict(context.model_config)
        model = load_captioner(context.artifacts[CAPTIONER_ARTIFACT])
        weights = context.artifacts.get(EXTRACTOR_ARTIFACT)
        if weights:
            # The extractor weights travel with the model; point the config at
            # this copy so ImageCaptioner rebuilds from it and checks its digest.
            model.model_config = dataclasses.replace(model.model_config, extractor_weights=weights)
        self.captioner = ImageCaptioner(model)
        self.vocabulary = model.vocabulary
        # Trace the extractor and the greedy loop now, not on the first request.
        self.captioner.caption_bytes([example_image_bytes()], method="greedy", max_len=2)

    # pd.DataFrame: what the scoring server passes after schema enforcement; the
    # hint also tells MLflow not to infer a signature from it (ours is explicit).
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per image: caption, score, and with return_attention words + attention."""
        from captioning.inference import ImageError

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
        except ImageError as err:
            raise bad_request(_TF_OP_PREFIX.sub("", str(err))) from None
        rows = []
        for i, caption in enumerate(result.captions):
            row = {"caption": caption, "score": float(result.scores[i])}
            if settings["return_attention"]:
                n = int(result.lengths[i])
                row["words"] = [self.vocabulary.words[t] for t in result.tokens[i, :n]]
                row["attention"] = np.round(result.attention_for(i), 6).tolist()  # (words, L)
            rows.append(row)
        return pd.DataFrame(rows)


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
    from mlflow.types.schema import Array

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
    from captioning.features import imagenet_weights_path

    key = extractor_weights.strip()
    if key.lower() == "none":
        return None
    if key.lower() == "imagenet":
        return imagenet_weights_path()  # from the keras cache: the server may be offline
    return Path(key).expanduser()


def captioner_model_kwargs(model_path: str | Path, config: ServingConfig) -> dict[str, Any]:
    """Everything `mlflow.pyfunc.log_model` / `save_model` need for the captioner.

    Ships the `.keras` file, the extractor weights when they are a file, this
    package's code (so `captioning` imports wherever the model is loaded),
    the signature, an input example, and pins the installed versions of the
    serving dependencies.
    """
    import captioning
    from captioning.model import load_captioner

    model_config = load_captioner(str(model_path)).model_config
    artifacts = {CAPTIONER_ARTIFACT: str(model_path)}
    weights = extractor_weights_file(model_config.extractor_weights)
    if weights is not None:
        artifacts[EXTRACTOR_ARTIFACT] = str(weights)
    example = pd.DataFrame(
        {IMAGE_COLUMN: [base64.b64encode(example_image_bytes()).decode("ascii")]}
    )
    return {
        "python_model": CaptionerModel(),
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


# ----------------------------------------------------------------------------- the real server


class ScoringServer:
    """`mlflow models serve --env-manager local` on 127.0.0.1, as a context manager.

    Used by the integration test and the load benchmark: starts the real
    server in its own process group, waits for `/ping`, and stops the whole
    group on exit. `rss_bytes()` sums the resident memory of its processes.
    """

    def __init__(
        self,
        model_uri: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        ready_timeout_s: float = 600.0,
    ):
        import os
        import sys

        self.model_uri = model_uri
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        # The server execs `uvicorn` by name: this interpreter's bin/ must come first.
        bin_dir = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout_s = ready_timeout_s
        self.process = None

    def __enter__(self) -> ScoringServer:
        import shutil
        import subprocess

        mlflow_cli = shutil.which("mlflow", path=self.env["PATH"]) or "mlflow"
        command = [
            mlflow_cli, "models", "serve", "-m", self.model_uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if self.log_path:
            log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def healthy(self, timeout: float = 5.0) -> bool:
        import requests

        try:
            return requests.get(f"{self.url}/ping", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self) -> None:
        import time

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode}; {self.tail()}"
                )
            if self.healthy(timeout=2.0):
                return
            time.sleep(0.5)
        raise TimeoutError(f"no /ping within {self.ready_timeout_s:.0f} s; {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        if not self.log_path or not self.log_path.exists():
            return "no server log"
        return "server log tail:\n" + self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> None:
        import os
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the group this object started
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def rss_bytes(self) -> int:
        """Resident memory of the server process and all its descendants."""
        return process_tree_rss(self.process.pid)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc; 0 when gone)."""
    return sum(_rss_bytes(p) for p in _descendants(pid))


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
