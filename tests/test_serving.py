"""The served model: request checks, the pyfunc model, how it is logged, and the real server.

Fast tests check request validation on its own, the pyfunc `predict` on an
untrained tiny model (no server; the scoring server's own request parsing is
called in-process, so the HTTP status and message are the ones a client gets),
every image format and EXIF orientation, and that the model is logged as code
(no pickle). The slow integration test trains a tiny model on demo data,
registers it through the `register` stage, serves it with the real `mlflow
models serve`, compares the served captions with `captioning caption`, sends
every kind of bad request, and checks that a worse second model does not take
the champion alias. The registry's rules are tested in test_registry.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from benchmarks.scoring_server import ScoringServer
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from PIL import Image

from captioning.config import EvaluateParams
from captioning.data.text import Vocabulary
from captioning.features import build_extractor, weights_digest
from captioning.serving import registry
from captioning.serving.inference import ImageCaptioner
from captioning.serving.pyfunc import (
    ServingConfig,
    captioner_model_kwargs,
    decode_base64_image,
    decoding_settings,
    log_captioner_model,
    request_images,
)
from captioning.training.checkpoints import save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def encode_as(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_pixels(height: int = 48, width: int = 80) -> np.ndarray:
    """A smooth, asymmetric picture (bright top-left corner): rotating it changes its look."""
    rows = np.linspace(255, 0, height)[:, None]
    cols = np.linspace(255, 0, width)[None, :]
    red = rows * cols / 255
    return np.stack(
        [red, np.broadcast_to(rows, red.shape), np.broadcast_to(cols, red.shape)], -1
    ).astype(np.uint8)  # (height, width, 3)


def exif_rotated_jpeg(pixels: np.ndarray) -> bytes:
    """A JPEG of `pixels` tagged EXIF orientation 6: "rotate 90 degrees clockwise to view"."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return encode_as(pixels, "JPEG", exif=exif.tobytes(), quality=95)


def stored_pixels(data: bytes) -> np.ndarray:
    """The pixels as stored in the file, orientation tag ignored."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------- request checks

CONFIG = ServingConfig(max_batch=3, max_pixels=100 * 100, max_image_bytes=50_000)


def test_request_images_accepts_the_shapes_the_server_passes():
    frame = pd.DataFrame({"image": ["a", "b"]})
    assert request_images(frame, 3) == ["a", "b"]
    assert request_images(["a"], 3) == ["a"]
    assert request_images(np.array(["a", "b"]), 3) == ["a", "b"]
    assert request_images({"image": ["a"]}, 3) == ["a"]


@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        ([], "empty batch"),
        (pd.DataFrame({"image": []}), "empty batch"),
        (["a"] * 4, "batch of 4 images exceeds the maximum of 3"),
        (pd.DataFrame({"img": ["a"]}), "expected one column 'image'"),
        ({"pixels": ["a"]}, "expected {'image'"),
        (42, "expected a list of base64 strings, got int"),
    ],
)
def test_request_images_rejects_bad_shapes(model_input, message):
    with pytest.raises(MlflowException) as err:
        request_images(model_input, 3)
    assert message in err.value.message
    assert err.value.get_http_status_code() == 400


def test_decode_base64_image_returns_the_bytes_and_ignores_line_breaks():
    data = jpeg_bytes()
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    assert decode_base64_image(wrapped, "image 0", CONFIG) == data
    assert decode_base64_image(b64(png_bytes(20, 20)), "image 0", CONFIG) == png_bytes(20, 20)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "image 0: empty string"),
        ("  \n", "image 0: empty string"),
        ("not base64!!", "image 0: not valid base64"),
        ("YWJj*GVm", "image 0: not valid base64"),
        (b64(b"hello, not an image"), "image 0: not an image format Pillow reads"),
        (b64(b"GIF89a" + bytes(40)), "image 0: not an image format Pillow reads"),
        (b64(png_bytes(64, 64)[:20]), "image 0: unreadable header (Truncated File Read)"),
        (b64(png_bytes(200, 200, "1")), "200x200 = 40000 pixels exceeds the bound of 10000"),
        ("A" * 80_000, "exceeds the limit of 50000 bytes"),
        (17, "expected a base64 string, got int"),
        ([b64(jpeg_bytes())], "expected a base64 string, got list"),
    ],
)
def test_decode_base64_image_names_the_problem(value, message):
    with pytest.raises(MlflowException) as err:
        decode_base64_image(value, "image 0", CONFIG)
    assert message in err.value.message
    assert err.value.get_http_status_code() == 400


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, at 89 M
def test_a_decompression_bomb_is_refused_from_its_header():
    # 15000 x 15000 = 225 M pixels: over twice Pillow's own bound, so Pillow itself refuses to open it.
    bomb = png_bytes(15_000, 15_000, "1")
    with pytest.raises(MlflowException, match="image 0: exceeds the bound of 50000000 pixels"):
        decode_base64_image(b64(bomb), "image 0", ServingConfig())
    # 10000 x 10000 = 100 M pixels: between Pillow's bound and twice it; the model's bound decides.
    big = png_bytes(10_000, 10_000, "1")
    with pytest.raises(MlflowException, match="= 100000000 pixels exceeds the bound of 50000000"):
        decode_base64_image(b64(big), "image 0", ServingConfig())
    roomy = ServingConfig(max_pixels=100_000_000, max_image_bytes=10**8)
    assert decode_base64_image(b64(big), "image 0", roomy) == big
    assert decode_base64_image(b64(png_bytes(300, 200)), "x", ServingConfig()) == png_bytes(
        300, 200
    )


def test_decoding_settings_merge_over_the_defaults_and_check_ranges():
    defaults = ServingConfig(decoder="beam", beam_size=4, max_length=20)
    assert decoding_settings(None, defaults) == {
        "decoder": "beam",
        "beam_size": 4,
        "length_penalty": 1.0,
        "max_length": 20,
        "temperature": 1.0,
        "return_attention": False,
    }
    assert decoding_settings({"decoder": "greedy", "max_length": 5}, defaults)["max_length"] == 5
    for params, message in [
        ({"decoder": "nucleus"}, "params.decoder='nucleus'"),
        ({"beam_size": 0}, "params.beam_size=0"),
        ({"beam_size": 1000}, "params.beam_size=1000"),
        ({"max_length": True}, "params.max_length=True"),
        ({"temperature": 0.0}, "params.temperature=0.0"),
        ({"length_penalty": -1}, "params.length_penalty=-1"),
        ({"length_penalty": "long"}, "params.length_penalty='long'"),
        ({"return_attention": "yes"}, "params.return_attention='yes'"),
    ]:
        with pytest.raises(MlflowException) as err:
            decoding_settings(params, defaults)
        assert message in err.value.message


# ----------------------------------------------------------------------------- the pyfunc model


# Sizes of the served test models: one InceptionV3 location at 75 px keeps them cheap to run.
SERVED_SIZES = {"embedding_dim": 8, "units": 8, "attention_units": 8, "encoder_dim": 8}


def tiny_untrained_model(tiny_captioner, path: Path, image_size: int = 75) -> Path:
    """An untrained captioner over a small InceptionV3 input (1 location at 75 px), saved."""
    save_model(tiny_captioner(None, (1, 2048), image_size=image_size, **SERVED_SIZES), path)
    return path


@pytest.fixture(scope="module")
def pyfunc_model(tmp_path_factory, tiny_captioner):
    """The pyfunc model saved and loaded the way the server loads it (no tracking store)."""
    root = tmp_path_factory.mktemp("pyfunc")
    keras_path = tiny_untrained_model(tiny_captioner, root / "tiny.keras")
    path = root / "model"
    config = ServingConfig(max_batch=3, max_pixels=400 * 400, max_length=24)
    mlflow.pyfunc.save_model(path, **captioner_model_kwargs(keras_path, config))
    return mlflow.pyfunc.load_model(str(path)), keras_path


def invoke(model, payload) -> tuple[int, dict]:
    """What the scoring server answers for a JSON body: (HTTP status, JSON body)."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    try:
        response = scoring_server.invocations(
            body, "application/json", model, model.metadata.get_input_schema()
        )
        return response.status, json.loads(response.response)
    except MlflowException as err:
        return err.get_http_status_code(), json.loads(err.serialize_as_json())


def test_pyfunc_captions_equal_the_library_captions(pyfunc_model):
    model, keras_path = pyfunc_model
    images = [jpeg_bytes(seed) for seed in range(3)]
    expected = ImageCaptioner(keras_path).caption_bytes(images, max_len=24)
    got = model.predict(pd.DataFrame({"image": [b64(i) for i in images]}))
    assert list(got["caption"]) == expected.captions
    np.testing.assert_allclose(got["score"], expected.scores, rtol=1e-5)


def test_pyfunc_returns_per_word_attention_when_asked(pyfunc_model):
    model, _ = pyfunc_model
    got = model.predict(
        pd.DataFrame({"image": [b64(jpeg_bytes())]}),
        params={"return_attention": True, "max_length": 4},
    )
    row = got.iloc[0]
    assert len(row["words"]) == len(row["attention"]) <= 4
    for weights in row["attention"]:
        assert len(weights) == 1 and abs(sum(weights) - 1) < 1e-4  # 1 location at 75 px


@pytest.mark.parametrize(
    ("decoder", "beam_size"), [("greedy", 3), ("sample", 3), ("beam", 1), ("beam", 2)]
)
def test_pyfunc_decodes_one_image_with_every_decoder(pyfunc_model, decoder, beam_size):
    model, _ = pyfunc_model
    got = model.predict(
        pd.DataFrame({"image": [b64(jpeg_bytes())]}),
        params={"decoder": decoder, "beam_size": beam_size},
    )
    assert len(got) == 1 and isinstance(got["caption"][0], str)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"inputs": ["%%%"]}, "image 0: not valid base64"),
        (
            {"inputs": [b64(jpeg_bytes()), b64(b"plain text")]},
            "image 1: not an image format Pillow reads",
        ),
        ({"inputs": [""]}, "image 0: empty string"),
        ({"inputs": [b64(jpeg_bytes()[:300])]}, "image 0: unreadable header (Truncated File Read)"),
        ({"inputs": [b64(jpeg_bytes()[:-600])]}, "image 0: a truncated or corrupt JPEG"),
        ({"inputs": [b64(png_bytes(64, 64)[:20])]}, "image 0: unreadable header (Truncated"),
        ({"inputs": [b64(encode_as(photo_pixels(), "TIFF")[:-40])]}, "a truncated or corrupt TIFF"),
        ({"inputs": [b64(png_bytes(500, 500, "1"))]}, "exceeds the bound of 160000 pixels"),
        ({"inputs": []}, "empty batch"),
        ({"inputs": [b64(jpeg_bytes())] * 4}, "exceeds the maximum of 3"),
        ({"inputs": [[b64(jpeg_bytes())]]}, "expected a base64 string, got list"),
        ({"images": ["x"]}, "dataframe_split"),  # no known input field
        ({"inputs": {"a": 1}}, "Failed to enforce schema"),
        ({"dataframe_split": {"columns": ["img"], "data": [["x"]]}}, "missing inputs ['image']"),
        ("{not json", "valid JSON"),
        ({"inputs": [b64(jpeg_bytes())], "params": {"beam_size": 99}}, "params.beam_size=99"),
        ({"inputs": [b64(jpeg_bytes())], "params": {"beam_size": "x"}}, "beam_size"),
    ],
)
def test_bad_requests_get_400_with_a_message_naming_the_problem(pyfunc_model, payload, message):
    status, body = invoke(pyfunc_model[0], payload)
    assert status == 400, body
    assert message in body["message"]


def test_both_json_formats_and_params_are_accepted(pyfunc_model):
    model, _ = pyfunc_model
    image = b64(jpeg_bytes())
    status, inputs = invoke(model, {"inputs": [image, image]})
    assert status == 200 and len(inputs["predictions"]) == 2
    status, split = invoke(
        model,
        {
            "dataframe_split": {"columns": ["image"], "data": [[image]]},
            "params": {"decoder": "beam", "beam_size": 2, "return_attention": True},
        },
    )
    assert status == 200
    (prediction,) = split["predictions"]
    assert set(prediction) == {"caption", "score", "words", "attention"}


@pytest.mark.parametrize(
    ("fmt", "options", "lossless"),
    [
        ("WEBP", {"lossless": True}, True),
        ("WEBP", {"quality": 80}, False),
        ("BMP", {}, True),
        ("TIFF", {}, True),
        ("GIF", {}, False),  # 256-colour palette: not the same pixels
    ],
)
def test_every_format_pillow_reads_gets_a_caption(pyfunc_model, fmt, options, lossless):
    model, _ = pyfunc_model
    pixels = photo_pixels()
    png = encode_as(pixels, "PNG")
    status, body = invoke(model, {"inputs": [b64(encode_as(pixels, fmt, **options)), b64(png)]})
    assert status == 200, body
    got, reference = body["predictions"]
    assert isinstance(got["caption"], str) and np.isfinite(got["score"])
    if lossless:
        assert got["caption"] == reference["caption"]
        assert got["score"] == pytest.approx(reference["score"], rel=1e-6)


def test_an_exif_rotated_photo_is_captioned_upright(pyfunc_model):
    model, _ = pyfunc_model
    photo = exif_rotated_jpeg(photo_pixels())
    stored = stored_pixels(photo)  # (48, 80, 3): as the camera wrote them
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # (80, 48, 3): orientation 6 turned
    upright_png, sideways_png = encode_as(upright, "PNG"), encode_as(stored, "PNG")
    got = model.predict(pd.DataFrame({"image": [b64(photo), b64(upright_png)]}))
    assert got["caption"][0] == got["caption"][1]
    assert got["score"][0] == pytest.approx(got["score"][1], rel=1e-6)
    captioner = model.unwrap_python_model().captioner
    pixels = captioner.preprocess([photo, upright_png, sideways_png])  # (3, 75, 75, 3)
    np.testing.assert_array_equal(pixels[0], pixels[1])
    assert np.abs(pixels[0] - pixels[2]).max() > 0.5  # the tag was not ignored


@pytest.mark.slow  # writes and copies a 90 MB InceptionV3 weights file
def test_extractor_weights_file_travels_with_the_model(tmp_path, tiny_captioner):
    weights = tmp_path / "inception.weights.h5"
    keras.applications.InceptionV3(
        include_top=False, weights=None, input_shape=(75, 75, 3)
    ).save_weights(weights)
    extractor = build_extractor(str(weights), 75)
    model = tiny_captioner(
        Vocabulary.build(["a red circle"], 10),
        (1, 2048),
        image_size=75,
        extractor_weights=str(weights),
        extractor_digest=weights_digest(extractor),
        **SERVED_SIZES,
    )
    keras_path = tmp_path / "tiny.keras"
    save_model(model, keras_path)
    images = [jpeg_bytes(1)]
    captioner = ImageCaptioner(keras_path, extractor=extractor)
    expected = captioner.caption_bytes(images, max_len=ServingConfig().max_length)
    mlflow.pyfunc.save_model(
        tmp_path / "model", **captioner_model_kwargs(keras_path, ServingConfig())
    )
    weights.rename(tmp_path / "moved.weights.h5")  # the served model must not need the original
    served = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    got = served.predict(pd.DataFrame({"image": [b64(i) for i in images]}))
    assert list(got["caption"]) == expected.captions


# ----------------------------------------------------------------------------- logging


@pytest.fixture
def tracking_store(tmp_path):
    """A fresh sqlite tracking store, active for the test."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also sets this variable
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield
    mlflow.set_tracking_uri(previous)


class _Messages(logging.Handler):
    """Collects the messages of a logger (MLflow's loggers do not propagate to pytest's)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_logged_model_has_signature_example_pinned_requirements_and_code(
    tracking_store, tmp_path, tiny_captioner
):
    keras_path = tiny_untrained_model(tiny_captioner, tmp_path / "tiny.keras")
    mlflow_logger, messages = logging.getLogger("mlflow"), _Messages()
    mlflow_logger.addHandler(messages)
    try:
        with mlflow.start_run():
            info = log_captioner_model(keras_path, ServingConfig(decoder="beam", max_batch=5))
    finally:
        mlflow_logger.removeHandler(messages)
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {
        "decoder": "beam",
        "beam_size": EvaluateParams().beam_size,
        "length_penalty": EvaluateParams().length_penalty,
        "max_length": EvaluateParams().max_len,
        "temperature": 1.0,
        "return_attention": False,
    }
    assert info.signature.inputs.input_names() == ["image"]
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    requirements = (local / "requirements.txt").read_text().split()
    for dist in ("keras==", "mlflow==", "pillow==", "numpy==", "pandas==", "tensorflow"):
        assert any(r.startswith(dist) and "==" in r for r in requirements), requirements
    assert (local / "code" / "captioning" / "serving" / "pyfunc.py").is_file()
    assert (local / "serving_input_example.json").is_file()
    # Logged as code: MLflow runs served_model.py on load; nothing is unpickled.
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert Path(flavor["model_code_path"]).name == "served_model.py"
    assert (local / "served_model.py").is_file()
    assert "python_model" not in flavor and not list(local.rglob("*.pkl"))
    assert not [m for m in messages.messages if "cloudpickle" in m.lower()], messages.messages


# ----------------------------------------------------------------------------- the real server


class Project:
    """A throwaway folder laid out like the repo for the `register` stage."""

    def __init__(self, root: Path, images: list[Path], max_batch: int):
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        shutil.copytree(
            REPO_ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__")
        )
        params = {
            "evaluate": {"split": "test", "decoder": "greedy", "beam_size": 3, "length_penalty": 1.0,
                         "temperature": 1.0, "max_len": 24, "batch_size": 8},
            "register": {"model_name": "image-captioner", "max_batch": max_batch,
                         "max_pixels": 89_478_485},
        }  # fmt: skip
        (root / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
        ids = list(range(1, len(images) + 1))
        (root / "data").mkdir()
        pd.DataFrame(
            {
                "image_id": ids,
                "path": [str(p) for p in images],
                "caption": [f"reference {i}" for i in ids],
                "split": "test",
            }
        ).to_parquet(root / "data" / "captions.parquet")
        (root / "reports").mkdir()
        predictions = [{"image_id": i, "caption": "x"} for i in ids]
        (root / "reports" / "predictions.json").write_text(json.dumps(predictions))

    def register(self, model: Path, cider: float) -> tuple[dict, str]:
        """A finished training run with these test metrics, then the stage; (registered.json, stdout)."""
        client = mlflow.MlflowClient(self.uri)
        experiment = client.get_experiment_by_name("image-captioning")
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment("image-captioning")
        )
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "test.CIDEr", cider)
        client.set_terminated(run.info.run_id)
        ref = self.root / "models" / "mlflow_run.json"
        ref.parent.mkdir(exist_ok=True)
        ref.write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id}))
        metrics = {"CIDEr": cider, "BLEU-4": cider / 3, "num_images": 4, "decoder": "greedy"}
        (self.root / "reports" / "metrics.json").write_text(json.dumps(metrics))
        done = subprocess.run(
            [
                sys.executable, "-m", "stages.register", "--model", str(model),
                "--metrics", "reports/metrics.json", "--predictions", "reports/predictions.json",
                "--table", "data/captions.parquet", "--run", str(ref),
                "--out", "reports/registered.json", "--savedmodel", "models/savedmodel",
            ],
            cwd=self.root, env=self.env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "cloudpickle" not in (done.stdout + done.stderr).lower()  # logged as code
        return json.loads((self.root / "reports" / "registered.json").read_text()), done.stdout


# The served GRU's sizes (demo_trained_captioner's `config`).
SERVED_GRU = {"embedding_dim": 16, "units": 32, "attention_units": 16, "encoder_dim": 16}


@pytest.mark.slow
def test_registered_champion_is_served_by_mlflow_models_serve(tmp_path, demo_trained_captioner):
    model_path, images = demo_trained_captioner(tmp_path, **SERVED_GRU)
    project = Project(tmp_path / "project", images, max_batch=4)
    registered, stdout = project.register(model_path, cider=0.8)
    assert (registered["version"], registered["alias"]) == ("1", "champion"), stdout
    assert "-> champion" in stdout
    client = mlflow.MlflowClient(project.uri)
    run = client.get_run(registered["run_id"])
    assert run.data.tags["registered_alias"] == "champion"
    assert run.data.metrics["test.CIDEr"] == 0.8  # the evaluation metrics stay on the run
    version = client.get_model_version("image-captioner", "1")
    assert version.tags[registry.TAG_EVAL_SET] == registered["eval_set_digest"]

    cli = subprocess.run(
        [str(VENV_BIN / "captioning"), "caption", "--json", "--max-len", "24"]
        + ["--model", str(model_path)]
        + [str(p) for p in images],
        capture_output=True, text=True, timeout=600, env=project.env,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    encoded = [b64(p.read_bytes()) for p in images]

    with ScoringServer(
        "models:/image-captioner@champion", env=project.env, log_path=tmp_path / "server.log"
    ) as server:

        def post(payload, timeout=120):
            body = payload if isinstance(payload, str) else json.dumps(payload)
            headers = {"Content-Type": "application/json"}
            return requests.post(
                f"{server.url}/invocations", data=body, headers=headers, timeout=timeout
            )

        served = post({"inputs": encoded})
        assert served.status_code == 200, served.text
        predictions = served.json()["predictions"]
        assert [p["caption"] for p in predictions] == [e["caption"] for e in expected]
        np.testing.assert_allclose(
            [p["score"] for p in predictions], [e["score"] for e in expected], rtol=1e-4
        )

        split = post(
            {
                "dataframe_split": {"columns": ["image"], "data": [[encoded[0]]]},
                "params": {"decoder": "beam", "beam_size": 3, "return_attention": True},
            }
        )
        assert split.status_code == 200, split.text
        (beam,) = split.json()["predictions"]
        assert len(beam["attention"]) == len(beam["words"]) == len(beam["caption"].split())
        assert all(len(w) == 64 for w in beam["attention"])  # the 8x8 grid per word

        # The same photo as lossless WebP, BMP and TIFF reads as the same pixels; GIF as a palette.
        pixels = stored_pixels(images[0].read_bytes())
        formats = [
            encode_as(pixels, "WEBP", lossless=True),
            encode_as(pixels, "BMP"),
            encode_as(pixels, "TIFF"),
            encode_as(pixels, "GIF"),
        ]
        other = post({"inputs": [b64(data) for data in formats]})
        assert other.status_code == 200, other.text
        captions = [p["caption"] for p in other.json()["predictions"]]
        assert captions[:3] == [expected[0]["caption"]] * 3 and captions[3]

        truncated = images[0].read_bytes()[: len(images[0].read_bytes()) // 2]
        bad_requests = [
            ({"inputs": ["this is not base64!"]}, "not valid base64"),
            ({"inputs": [b64(b"%PDF-1.4 not an image")]}, "not an image format Pillow reads"),
            ({"inputs": [""]}, "empty string"),
            ({"inputs": [b64(truncated)]}, "a truncated or corrupt JPEG"),
            ({"inputs": [b64(png_bytes(10_000, 10_000, "1"))]}, "exceeds the bound of 89478485"),
            ({"images": encoded[:1]}, "dataframe_split"),
            ({"inputs": [encoded[:1]]}, "expected a base64 string"),
            ("[1, 2", "valid JSON"),
            ({"inputs": []}, "empty batch"),
            ({"inputs": encoded[:1] * 5}, "batch of 5 images exceeds the maximum of 4"),
            ({"inputs": encoded[:1], "params": {"max_length": 0}}, "params.max_length=0"),
        ]
        for payload, message in bad_requests:
            response = post(payload)
            assert response.status_code == 400, (message, response.status_code, response.text[:500])
            assert message in response.json()["message"], response.text[:2000]
            assert server.healthy(), f"server unhealthy after a request about {message!r}"
        again = post({"inputs": encoded})
        assert [p["caption"] for p in again.json()["predictions"]] == [
            e["caption"] for e in expected
        ]

        worse_path, _ = demo_trained_captioner(tmp_path, seed=1, epochs=0, **SERVED_GRU)
        worse, stdout = project.register(worse_path, cider=0.3)
        assert (worse["version"], worse["alias"]) == ("2", "challenger")
        assert "does not beat" in stdout and "0.8000" in stdout
        assert str(client.get_model_version_by_alias("image-captioner", "champion").version) == "1"
        assert server.healthy()
    assert server.process.poll() is not None  # stopped
