"""Load benchmark of the served captioner: `python -m benchmarks.serve_load [options]`.

Sends a bounded number of `POST /invocations` requests (default 300, 8 at a
time) to a scoring server on 127.0.0.1 and prints, per scenario (images per
request x concurrency), p50/p95/p99 latency, throughput, errors, and the
server's resident memory before, at its peak during, and after the run. It is
a measurement, not a test: nothing here asserts a time.

Which server: `--url http://127.0.0.1:PORT` measures one already running
(memory only with `--server-pid`); otherwise it starts `mlflow models serve
--env-manager local` itself on a free loopback port, for `--model-uri`
(default `models:/image-captioner@champion` in the repo's `mlflow.db`) or,
with `--untrained`, for an untrained model of the default (tutorial) size
logged to a throwaway store: an untrained model rarely writes `<end>`, so its
greedy decoding runs all `max_length` steps, an upper bound on a trained
model's cost (decoding stops once every caption of a batch has ended).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import requests

from benchmarks.scoring_server import ScoringServer, process_tree_rss
from captioning.config import EvaluateParams, TokenizeParams, TrainParams
from captioning.data.demo import generate_demo
from captioning.data.text import SPECIAL_TOKENS, Vocabulary
from captioning.features import build_extractor, weights_digest
from captioning.model.captioner import ModelConfig, build_captioner
from captioning.serving.pyfunc import ServingConfig, log_captioner_model
from captioning.tracking import runs as tracking
from captioning.training.checkpoints import save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def demo_images(folder: Path, count: int = 16) -> list[bytes]:
    """JPEG bytes of `count` demo images (299x299 scenes), generated into `folder`."""
    generate_demo(folder, count, 0, seed=11)
    return [p.read_bytes() for p in sorted((folder / "train2014").glob("*.jpg"))][:count]


def untrained_model_uri(store: Path) -> str:
    """Log an untrained default-size captioner to a sqlite store under `store`; its models:/ URI."""
    train, tokenize, evaluate = TrainParams(), TokenizeParams(), EvaluateParams()
    vocab = Vocabulary(list(SPECIAL_TOKENS) + [f"word{i}" for i in range(tokenize.vocab_size)])
    digest = weights_digest(build_extractor("none", 299, 0))
    config = ModelConfig(
        vocab_size=len(vocab),
        embedding_dim=train.embedding_dim,
        units=train.units,
        attention_units=train.attention_units,
        encoder_dim=train.encoder_dim,
        extractor_digest=digest,
    )
    path = store / "untrained.keras"
    save_model(build_captioner(config, vocab, seed=0), path)
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_experiment("serve-load-benchmark")
    with mlflow.start_run():
        info = log_captioner_model(path, ServingConfig(max_length=evaluate.max_len))
    return info.model_uri


class MemoryWatch:
    """Samples the server's RSS (process and descendants) every `period` seconds."""

    def __init__(self, pid: int | None, period: float = 0.5):
        self.pid, self.period = pid, period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int | None:
        return process_tree_rss(self.pid) if self.pid else None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(self.rss())

    def __enter__(self) -> MemoryWatch:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_scenario(
    url: str,
    images: list[bytes],
    batch: int,
    concurrency: int,
    requests_total: int,
    params: dict,
    server_pid: int | None,
    warmup: int = 3,
) -> dict:
    """`requests_total` requests of `batch` images each, `concurrency` in flight at a time."""
    encoded = [base64.b64encode(i).decode("ascii") for i in images]
    bodies = [
        json.dumps(
            {
                "inputs": [encoded[(n * batch + k) % len(encoded)] for k in range(batch)],
                "params": params,
            }
        )
        for n in range(requests_total)
    ]
    local = threading.local()

    def send(body: str) -> tuple[float, str | None]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        start = time.perf_counter()
        try:
            response = session.post(
                f"{url}/invocations",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=300,
            )
            error = None if response.status_code == 200 else f"HTTP {response.status_code}"
            if error is None and len(response.json()["predictions"]) != batch:
                error = "wrong number of predictions"
        except requests.RequestException as err:
            error = type(err).__name__
        return time.perf_counter() - start, error

    for body in bodies[:warmup]:  # trace this batch shape before timing
        send(body)
    watch = MemoryWatch(server_pid)
    rss_before = watch.rss()
    with watch, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(send, bodies))
        wall = time.perf_counter() - start
    rss_after = watch.rss()
    latencies = [t * 1000 for t, error in results if error is None]
    errors = [error for _, error in results if error is not None]
    return {
        "params": params,
        "images_per_request": batch,
        "concurrency": concurrency,
        "requests": requests_total,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
        "requests_per_s": requests_total / wall,
        "images_per_s": requests_total * batch / wall,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "rss_before_mb": rss_before / 2**20 if rss_before else None,
        "rss_peak_mb": max(watch.samples) / 2**20 if watch.samples else None,
        # A leak keeps climbing; warm-up growth (allocator arenas, traced shapes) levels off.
        "rss_peak_first_half_mb": _peak(watch.samples[: len(watch.samples) // 2]),
        "rss_peak_second_half_mb": _peak(watch.samples[len(watch.samples) // 2 :]),
        "rss_after_mb": rss_after / 2**20 if rss_after else None,
        "load_average": os.getloadavg(),
    }


def _peak(samples: list[int]) -> float | None:
    return max(samples) / 2**20 if samples else None


def format_row(r: dict) -> str:
    memory = (
        f"rss {r['rss_before_mb']:.0f} MB before, peak {r['rss_peak_first_half_mb'] or 0:.0f} "
        f"(1st half) / {r['rss_peak_second_half_mb'] or 0:.0f} (2nd half), "
        f"{r['rss_after_mb']:.0f} after"
        if r["rss_before_mb"]
        else "rss n/a"
    )
    return (
        f"{r['images_per_request']:>2} img x {r['concurrency']:>2} conc, {r['requests']} req: "
        f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
        f"{r['requests_per_s']:.2f} req/s = {r['images_per_s']:.2f} img/s, "
        f"errors {r['errors']}, {memory}, load {r['load_average'][0]:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="an already running server on 127.0.0.1")
    target.add_argument("--model-uri", default="models:/image-captioner@champion")
    target.add_argument(
        "--untrained", action="store_true", help="serve a default-size untrained model"
    )
    parser.add_argument("--server-pid", type=int, help="with --url: its pid, to read its memory")
    parser.add_argument("--requests", type=int, default=300, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="images per request")
    parser.add_argument("--decoder", default="greedy", choices=["greedy", "sample", "beam"])
    parser.add_argument("--max-length", type=int, help="words per caption (default: the model's)")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.requests > 10_000:
        parser.error("--requests must be from 1 to 10000")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error("--url must point at 127.0.0.1: this benchmark only loads loopback servers")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp, contextlib.ExitStack() as stack:
        images = demo_images(Path(tmp) / "demo")
        if args.url:
            url, pid = args.url.rstrip("/"), args.server_pid
        else:
            env = {"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
            if args.untrained:
                model_uri = untrained_model_uri(Path(tmp))
                env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
            else:
                model_uri = args.model_uri
                env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(REPO_ROOT)
            print(f"starting mlflow models serve -m {model_uri} ...", flush=True)
            started = time.perf_counter()
            server = stack.enter_context(
                ScoringServer(model_uri, env=env, log_path=Path(tmp) / "server.log")
            )
            print(f"ready in {time.perf_counter() - started:.1f} s at {server.url}", flush=True)
            url, pid = server.url, server.process.pid
        params = {"decoder": args.decoder}
        if args.max_length:
            params["max_length"] = args.max_length
        results = []
        for concurrency in args.concurrency:
            for batch in args.batch:
                result = run_scenario(url, images, batch, concurrency, args.requests, params, pid)
                results.append(result)
                print(format_row(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
