"""The served model's memory under concurrent clients sending large photos: `serve_memory`.

Serves an untrained tiny captioner over a 75 px InceptionV3 as the pyfunc model
with the register defaults of params.yaml (request limit, concurrency, pixel
budget) through `mlflow models serve`, and has 16 client threads each post one
request of 16 12-Mpx JPEGs (one photo, about 1.8 MB) while the server's process
tree is sampled every 20 ms. Reports baseline, peak and after-burst RSS and the
bound the limits imply. Decoding, not the 75 px model, is the cost measured.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

from benchmarks.harness import PeakSampler, Result
from benchmarks.scoring_server import ScoringServer, process_tree_rss
from benchmarks.workspace import SMALL_IMAGE
from captioning.serving.pyfunc import ServingConfig

BYTES_PER_DECODED_PIXEL = 18  # uint8 RGB, then float32 RGB in the resize
MIB = 2**20
WIDTHS = {"embedding_dim": 8, "units": 8, "attention_units": 8, "encoder_dim": 8}


def photo(width: int, height: int) -> bytes:
    """A JPEG of a lit, grainy wall: about 1.8 MB at 4000 x 3000."""
    light = np.linspace(40, 215, width)[None, :, None] * np.linspace(0.6, 1, height)[:, None, None]
    grain = np.random.default_rng(0).normal(0, 5, (height, width, 1))
    pixels = np.clip(light + grain, 0, 255).astype(np.uint8).repeat(3, axis=2)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def bench_serve_memory(ws) -> Result:
    clients, photos, (width, height) = (2, 2, (800, 600)) if ws.quick else (16, 16, (4000, 3000))
    config = ServingConfig(max_length=8)  # every bound at its register default
    _, model = ws.pyfunc_model("serve-memory", SMALL_IMAGE, config, **WIDTHS)
    body = json.dumps({"inputs": [base64.b64encode(photo(width, height)).decode()] * photos})
    env = {"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "1800"}  # queued requests wait their turn
    log = ws.root / "serve-memory.log"
    with ScoringServer(str(model), log_path=log, env=env) as server:
        pid = server.process.pid

        def post(_=None) -> int:
            headers = {"Content-Type": "application/json"}
            return requests.post(f"{server.url}/invocations", data=body, headers=headers,
                                 timeout=1800).status_code  # fmt: skip

        assert post() == 200, f"the first request failed; see {log}"
        time.sleep(1)
        baseline = process_tree_rss(pid)
        started = time.perf_counter()
        with (
            PeakSampler(lambda: process_tree_rss(pid), 0.02) as rss,
            ThreadPoolExecutor(clients) as pool,
        ):
            statuses = list(pool.map(post, range(clients)))
        elapsed = time.perf_counter() - started
        time.sleep(2)
        after = process_tree_rss(pid)
    bound = (config.max_concurrent_requests * 4 * config.max_request_bytes
             + config.decode_budget_pixels * BYTES_PER_DECODED_PIXEL)  # fmt: skip
    result = Result(
        f"serve_memory: {clients} clients x {photos} photos of {width}x{height} "
        f"({len(body) / MIB:.1f} MiB per request), limits {config.max_concurrent_requests} "
        f"requests, {config.decode_budget_pixels:,} px decoding"
    )
    result.add("RSS baseline", baseline / MIB, "MiB")
    result.add("RSS peak above baseline", (max(rss.peak, baseline) - baseline) / MIB, "MiB")
    result.add("bound from the limits", bound / MIB, "MiB")
    result.add("RSS after the burst above baseline", (after - baseline) / MIB, "MiB")
    result.add("burst seconds", elapsed, "s")
    result.add("failed requests", sum(status != 200 for status in statuses), "")
    result.check("failed requests", "0", all(status == 200 for status in statuses))
    return result
