"""The served model's memory under 16 concurrent clients sending 16 large photos each.

Saves an untrained tiny captioner over a 75 px InceptionV3 as the pyfunc model
with the register defaults of params.yaml (request limit, concurrency, pixel
budget), serves it with `mlflow models serve`, and has CLIENTS threads each post
one request of PHOTOS 12 Mpx JPEGs (the same photo, about 1.8 MB) while psutil
samples the server's process tree every 20 ms. Prints baseline, peak and
after-burst RSS and the bound the limits imply. Decoding, not the 75 px model,
is the cost measured: the served model's extractor size does not change it.
Run: `python -m benchmarks.serve_memory` (a few minutes on 2 cores).
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import psutil
import requests
from PIL import Image

from benchmarks.scoring_server import ScoringServer
from captioning.config import RegisterParams
from captioning.data.text import Vocabulary
from captioning.model.captioner import ModelConfig, build_captioner
from captioning.serving.pyfunc import ServingConfig, captioner_model_kwargs
from captioning.training.checkpoints import save_model

CLIENTS, PHOTOS = 16, 16
BYTES_PER_DECODED_PIXEL = 18  # uint8 RGB, then float32 RGB in the resize
MiB = 1 << 20


def photo(width: int = 4000, height: int = 3000) -> bytes:
    light = (
        np.linspace(40, 215, width)[None, :, None] * np.linspace(0.6, 1.0, height)[:, None, None]
    )
    grain = np.random.default_rng(0).normal(0, 5, (height, width, 1))
    pixels = np.clip(light + grain, 0, 255).astype(np.uint8).repeat(3, axis=2)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def main() -> None:
    config = ServingConfig(max_length=8)  # every bound at its register default
    root = Path(tempfile.mkdtemp(prefix="serve-memory-"))
    vocabulary = Vocabulary.build(["a photo of light"], 10)
    model_config = ModelConfig(
        vocab_size=len(vocabulary), feature_dim=2048, num_locations=1, image_size=75,
        embedding_dim=8, units=8, attention_units=8, encoder_dim=8,
    )  # fmt: skip
    save_model(build_captioner(model_config, vocabulary, seed=0), root / "tiny.keras")
    mlflow.pyfunc.save_model(root / "model", **captioner_model_kwargs(root / "tiny.keras", config))
    body = json.dumps({"inputs": [base64.b64encode(photo()).decode()] * PHOTOS})
    env = {"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "1800"}  # queued requests wait their turn
    with ScoringServer(str(root / "model"), log_path=root / "server.log", env=env) as server:
        url, headers = f"{server.url}/invocations", {"Content-Type": "application/json"}
        assert requests.post(url, data=body, headers=headers, timeout=1800).status_code == 200
        time.sleep(1)
        baseline = tree_rss(server.process.pid)
        peak, done = [baseline], threading.Event()

        def sample():
            while not done.is_set():
                peak.append(tree_rss(server.process.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = list(
                pool.map(
                    lambda _: (
                        requests.post(url, data=body, headers=headers, timeout=1800).status_code
                    ),
                    range(CLIENTS),
                )
            )
        done.set()
        sampler.join()
        elapsed = time.perf_counter() - started
        time.sleep(2)
        after = tree_rss(server.process.pid)
    bound = (
        config.max_concurrent_requests * 4 * config.max_request_bytes
        + config.decode_budget_pixels * BYTES_PER_DECODED_PIXEL
    )
    print(
        f"{CLIENTS} clients x {PHOTOS} photos of 12 Mpx ({len(body) / MiB:.1f} MiB per request), "
        f"statuses {sorted(set(statuses))}, {elapsed:.0f} s; limits: "
        f"{RegisterParams.max_concurrent_requests} requests, {config.decode_budget_pixels} px decoding"
    )
    print(
        f"RSS baseline {baseline / MiB:.0f} MiB, peak +{(max(peak) - baseline) / MiB:.0f} MiB "
        f"(bound from the limits +{bound / MiB:.0f} MiB), after +{(after - baseline) / MiB:.0f} MiB"
    )


if __name__ == "__main__":
    main()
