"""The served model under bad and heavy input, over real HTTP against `mlflow models serve`.

One module-scoped server (an untrained tiny captioner over a 75 px InceptionV3,
saved as the pyfunc model and served with `--env-manager local`) answers every
case: error replies are short and never echo the request; a body over the
request limit gets 413 before it is read (with or without Content-Length); a
missing or non-JSON Content-Type gets 415; an image over the pixel bound, too
small or too thin gets 400 from its header; a 16-bit PNG is captioned as its
8-bit scaling; and a burst of large photos from concurrent clients keeps the
server's memory (psutil, the whole process tree) within the bound its limits
imply and lets it fall back near the baseline afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import requests
from benchmarks.scoring_server import ScoringServer
from PIL import Image

from captioning.serving.pyfunc import ServingConfig, captioner_model_kwargs
from captioning.training.checkpoints import save_model

pytestmark = pytest.mark.slow

MiB = 1 << 20
# Small enough for a test to cross cheaply; two 12 Mpx photos decode at once at most.
CONFIG = ServingConfig(
    max_length=8,
    max_request_bytes=16 * MiB,
    max_concurrent_requests=2,
    decode_budget_pixels=24_000_000,
)
BYTES_PER_DECODED_PIXEL = 18  # uint8 RGB, then float32 RGB in the resize (docs/serving.md)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A width x height greyscale PNG with no pixel data: enough for the header checks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def large_photo(seed: int, width: int = 4000, height: int = 3000) -> bytes:
    """A 12 Mpx JPEG (a phone photo's size): smooth light with grain, about 2 MB."""
    rng = np.random.default_rng(seed)
    light = (
        np.linspace(40, 215, width)[None, :, None] * np.linspace(0.6, 1.0, height)[:, None, None]
    )
    grain = rng.normal(0, 5, (height, width, 1))
    pixels = np.clip(light + grain + [[[0, 10, 20]]], 0, 255).astype(np.uint8)  # (H, W, 3)
    return encode(Image.fromarray(pixels), "JPEG", quality=85)


def tree_rss(pid: int) -> int:
    """Resident bytes of the server and every process it forked."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that just exited
            total += process.memory_info().rss
    return total


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_captioner):
    root = tmp_path_factory.mktemp("limits")
    sizes = {"embedding_dim": 8, "units": 8, "attention_units": 8, "encoder_dim": 8}
    save_model(tiny_captioner(None, (1, 2048), image_size=75, **sizes), root / "tiny.keras")
    mlflow.pyfunc.save_model(root / "model", **captioner_model_kwargs(root / "tiny.keras", CONFIG))
    with ScoringServer(str(root / "model"), log_path=root / "server.log") as running:
        yield running


def post(server, body: bytes | str, content_type: str | None = "application/json", **kwargs):
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(
        f"{server.url}/invocations", data=body, headers=headers, timeout=120, **kwargs
    )


def inputs(*images: bytes) -> str:
    return json.dumps({"inputs": [b64(i) for i in images]})


def assert_short_error(response, status: int, message: str) -> None:
    assert response.status_code == status, response.text[:500]
    assert len(response.content) < 700, len(response.content)
    body = response.json()
    assert set(body) == {"error_code", "message"} and message in body["message"], body


def test_an_error_names_the_image_and_never_repeats_the_request(server):
    good = encode(Image.new("RGB", (64, 64), (200, 30, 30)))
    bad = np.random.default_rng(0).bytes(50_000)  # 50 KB that is no image
    response = post(server, inputs(good, good, bad))
    assert_short_error(response, 400, "image 2: not an image format Pillow reads (50000 bytes")
    assert b64(bad)[:40] not in response.text and b64(good)[:40] not in response.text
    schema = post(server, json.dumps({"inputs": {"picture": "A" * 50_000}}))
    assert_short_error(schema, 400, "missing inputs ['image']")
    assert "AAAAAAAAAA" not in schema.text
    broken = post(server, '{"inputs": ["' + "A" * 50_000)  # the string never ends
    assert_short_error(broken, 400, "Ensure that input is a valid JSON formatted string")
    assert "AAAAAAAAAA" not in broken.text
    # A 50000-digit number: Python's JSON parser raises ValueError, which MLflow leaves as a 500.
    digits = post(server, '{"inputs": [' + "1" * 50_000 + "]}")
    assert_short_error(digits, 400, "the request body could not be read: ValueError: Exceeds")


def test_a_body_over_the_limit_gets_413_before_it_is_read(server):
    before = tree_rss(server.process.pid)
    started = time.perf_counter()
    response = post(server, b"x" * (CONFIG.max_request_bytes + 1))
    assert_short_error(response, 413, f"exceeds the limit of {CONFIG.max_request_bytes} bytes")
    assert f"of {CONFIG.max_request_bytes + 1} bytes" in response.json()["message"]

    def chunks():  # no Content-Length: refused once the limit is crossed
        for _ in range(CONFIG.max_request_bytes // MiB + 4):
            yield b"x" * MiB

    chunked = post(server, chunks())
    assert_short_error(chunked, 413, f"exceeds the limit of {CONFIG.max_request_bytes} bytes")
    assert time.perf_counter() - started < 20
    assert tree_rss(server.process.pid) - before < 2 * CONFIG.max_request_bytes
    assert server.healthy()


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        (
            None,
            "missing Content-Type header: send the JSON body with 'Content-Type: application/json'",
        ),
        ("text/csv", "Content-Type 'text/csv' is not accepted"),
        ("image/jpeg", "Content-Type 'image/jpeg' is not accepted"),
    ],
)
def test_a_missing_or_wrong_content_type_gets_415(server, content_type, message):
    response = post(server, inputs(encode(Image.new("RGB", (32, 32)))), content_type)
    assert_short_error(response, 415, message)


def test_charset_parameter_is_accepted(server):
    response = post(
        server, inputs(encode(Image.new("RGB", (32, 32)))), "application/json; charset=utf-8"
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (
            png_header(9400, 9400),
            "9400x9400 = 88360000 pixels exceeds the bound of 50000000 pixels",
        ),
        (
            png_header(1, 1),
            "image 0: 1x1 is too small: the shorter side must be at least 16 pixels",
        ),
        (png_header(10_000, 20), "image 0: 10000x20 has an aspect ratio of 500.0:1; at most 10:1"),
    ],
    ids=["9400x9400", "1x1", "10000x20"],
)
def test_pixel_bound_and_shape_are_checked_from_the_header(server, image, message):
    assert len(image) < 100
    assert_short_error(post(server, inputs(image)), 400, message)


def test_a_16_bit_png_is_captioned_as_its_8_bit_scaling(server):
    rows = np.linspace(0, 65535, 48)[:, None] * np.linspace(0.2, 1.0, 64)[None, :]
    wide = rows.astype(np.uint16)  # (48, 64) 16-bit greyscale
    scaled = np.rint(wide / 257).astype(np.uint8)
    white = np.full_like(scaled, 255)
    body = inputs(
        encode(Image.fromarray(wide)),
        encode(Image.fromarray(scaled)),
        encode(Image.fromarray(white)),
    )
    response = post(server, body)
    assert response.status_code == 200, response.text
    got, expected, clipped = response.json()["predictions"]
    assert got["caption"] == expected["caption"]
    assert got["score"] == pytest.approx(expected["score"], rel=1e-6)
    assert got["score"] != pytest.approx(clipped["score"], rel=1e-6)  # not read as all white


def test_memory_stays_bounded_under_a_burst_of_large_photos_and_comes_back(server):
    clients, requests_each, photos_each = 6, 1, 3
    photos = [large_photo(0)] * photos_each
    body = inputs(*photos)
    assert len(body) < CONFIG.max_request_bytes
    assert post(server, body).status_code == 200  # warm up this batch shape
    time.sleep(1.0)
    baseline = tree_rss(server.process.pid)
    peak, done = [baseline], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(tree_rss(server.process.pid))
            time.sleep(0.02)

    def client(_):
        return [post(server, body).status_code for _ in range(requests_each)]

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as pool:
            statuses = [s for result in pool.map(client, range(clients)) for s in result]
    finally:
        done.set()
        sampler.join()
    elapsed = time.perf_counter() - started
    time.sleep(1.0)
    after = tree_rss(server.process.pid)
    # What the limits allow at once: the admitted requests' bodies and their parsed and
    # decoded copies (about 4 per body), the pixel budget's decoding memory, and 128 MiB
    # for the extractor's activations and the threads' stacks.
    bound = (
        CONFIG.max_concurrent_requests * 4 * len(body)
        + CONFIG.decode_budget_pixels * BYTES_PER_DECODED_PIXEL
        + 128 * MiB
    )
    print(
        f"\n{clients} clients x {requests_each} requests x {photos_each} photos of 12 Mpx "
        f"({len(body) / MiB:.1f} MiB each) in {elapsed:.1f} s: RSS baseline {baseline / MiB:.0f} MiB, "
        f"peak +{(max(peak) - baseline) / MiB:.0f} MiB (bound +{bound / MiB:.0f}), "
        f"after +{(after - baseline) / MiB:.0f} MiB"
    )
    assert statuses == [200] * clients * requests_each
    assert max(peak) - baseline < bound
    assert after - baseline < 150 * MiB
    assert server.healthy()


def test_the_guard_is_not_installed_outside_the_scoring_server(tmp_path, tiny_captioner):
    import fastapi

    original = fastapi.FastAPI
    sizes = {"embedding_dim": 8, "units": 8, "attention_units": 8, "encoder_dim": 8}
    save_model(tiny_captioner(None, (1, 2048), image_size=75, **sizes), tmp_path / "tiny.keras")
    mlflow.pyfunc.save_model(
        tmp_path / "model", **captioner_model_kwargs(tmp_path / "tiny.keras", CONFIG)
    )
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert fastapi.FastAPI is original
    frame = pd.DataFrame({"image": [b64(encode(Image.new("RGB", (32, 32))))]})
    assert len(model.predict(frame)) == 1  # and it predicts in-process
