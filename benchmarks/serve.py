"""Load benchmark of the served captioner: `python -m benchmarks serve [options]`.

Sends a bounded number of `POST /invocations` requests (default 300, 8 at a
time; 12 with `--quick`) to a scoring server on 127.0.0.1 and reports, per
scenario (images per request x concurrency), p50/p95/p99 latency, throughput,
errors, and the server's resident memory before, at its peak in each half of
the run, and after. A measurement: it asserts no time, only that no request
failed.

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

import base64
import contextlib
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import requests

from benchmarks.harness import PeakSampler, Result
from benchmarks.scoring_server import ScoringServer, process_tree_rss
from benchmarks.workspace import REPO_ROOT, tutorial_model
from captioning.features import build_extractor, weights_digest
from captioning.serving.pyfunc import ServingConfig, log_captioner_model
from captioning.tracking import runs as tracking
from captioning.training.checkpoints import save_model

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
QUICK_REQUESTS = 12
MIB = 2**20


def untrained_model_uri(store: Path, vocab_size: int) -> str:
    """Log an untrained default-size captioner to a sqlite store under `store`; its models:/ URI."""
    digest = weights_digest(build_extractor("none", 299, 0))
    model = tutorial_model(vocab_size, extractor_digest=digest)
    path = store / "untrained.keras"
    save_model(model, path)
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_experiment("serve-load-benchmark")
    with mlflow.start_run():
        return log_captioner_model(path, ServingConfig()).model_uri


def run_scenario(url, images, batch, concurrency, total, params, pid, warmup=3) -> dict:
    """`total` requests of `batch` images each, `concurrency` in flight at a time."""
    encoded = [base64.b64encode(i).decode("ascii") for i in images]
    bodies = [
        json.dumps({"inputs": [encoded[(n * batch + k) % len(encoded)] for k in range(batch)],
                    "params": params})
        for n in range(total)
    ]  # fmt: skip
    local = threading.local()

    def send(body: str) -> tuple[float, str | None]:
        local.session = getattr(local, "session", None) or requests.Session()
        start = time.perf_counter()
        try:
            response = local.session.post(
                f"{url}/invocations", data=body, timeout=300,
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            error = None if response.status_code == 200 else f"HTTP {response.status_code}"
            if error is None and len(response.json()["predictions"]) != batch:
                error = "wrong number of predictions"
        except requests.RequestException as err:
            error = type(err).__name__
        return time.perf_counter() - start, error

    for body in bodies[:warmup]:  # trace this batch shape before timing
        send(body)
    rss = (lambda: process_tree_rss(pid)) if pid else (lambda: None)
    before = rss()
    with PeakSampler(rss, period=0.5) as watch, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(send, bodies))
        wall = time.perf_counter() - start
    latencies = [t * 1000 for t, error in results if error is None]
    errors = sorted({error for _, error in results if error is not None})
    half = len(watch.samples) // 2
    row = {"scenario": f"{batch} img x {concurrency} in flight", "requests": total}
    for q in (50, 95, 99):
        row[f"p{q} ms"] = float(np.percentile(latencies, q)) if latencies else float("nan")
    row["mean ms"] = statistics.fmean(latencies) if latencies else float("nan")
    row["requests/s"], row["images/s"] = total / wall, total * batch / wall
    row["errors"] = sum(error is not None for _, error in results)
    if pid:  # a leak keeps climbing; warm-up growth (allocator, traced shapes) levels off
        row["RSS before MiB"] = before / MIB
        row["RSS peak 1st half MiB"] = max(watch.samples[:half], default=0) / MIB
        row["RSS peak 2nd half MiB"] = max(watch.samples[half:], default=0) / MIB
        row["RSS after MiB"] = rss() / MIB
    row["load average"] = os.getloadavg()[0]
    return row | ({"error kinds": ", ".join(errors)} if errors else {})


def bench_serve(ws) -> Result:
    o = ws.options
    if o.url and urlparse(o.url).hostname not in LOOPBACK:
        raise SystemExit(
            "--url must point at 127.0.0.1: this benchmark only loads loopback servers"
        )
    total = min(o.requests, QUICK_REQUESTS) if ws.quick else o.requests
    if not 1 <= total <= 10_000:
        raise SystemExit("--requests must be from 1 to 10000")
    images = [Path(path).read_bytes() for path in ws.images(16)["path"]]
    with contextlib.ExitStack() as stack:
        if o.url:
            url, pid, what = o.url.rstrip("/"), o.server_pid, o.url
        else:
            env = {"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
            if o.untrained:
                what = untrained_model_uri(ws.root, ws.vocab_size)
                env["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws.root / 'mlflow.db'}"
            else:
                what = o.model_uri
                env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(REPO_ROOT)
            started = time.perf_counter()
            log = ws.root / "server.log"
            server = stack.enter_context(ScoringServer(what, env=env, log_path=log))
            ready_s = time.perf_counter() - started
            url, pid = server.url, server.process.pid
        result = Result(f"serve: POST /invocations to {what}, {total} requests per scenario")
        if not o.url:
            result.add("server start until /ping answers", ready_s, "s")
        params = {"decoder": o.decoder, **({"max_length": o.max_length} if o.max_length else {})}
        for concurrency in o.concurrency:
            for batch in o.batch:
                row = run_scenario(url, images, batch, concurrency, total, params, pid)
                result.add_row(row)
    failed = sum(row["errors"] for row in result.rows)
    result.add("failed requests", failed, "")
    result.check("failed requests", "0", failed == 0)
    return result
