"""Keras 3 `model.fit` under MultiWorkerMirroredStrategy, two workers on loopback.

Reproduces why the distributed train stage runs its own loop
(captioning.training.distributed) instead of `fit`: with two or more workers, `fit`
fails when it reduces values across workers: its scalar metrics in
tensorflow#72388 and keras-team/keras#20585; with TensorFlow 2.21 and Keras
3.15 already the first batch, which `fit` reduces to build the model
("Attempt to convert a value (PerReplica:{...}) with an unsupported type").
`DISTRIBUTED_INPUT=1` passes the dataset distributed by the strategy instead,
which fails the same way. Run from the repository root:

    python -m benchmarks.multi_worker_fit

It starts two worker processes on 127.0.0.1 (free ports, TF_CONFIG each),
waits at most two minutes, prints each worker's exit status and the last
error line of its log, with the TensorFlow and Keras versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from captioning.server_process import ServerProcess, free_port, port_open


def fit_one_worker() -> None:
    """One worker: a two-layer model, `fit` for two steps with a scalar metric."""
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    keras.config.disable_traceback_filtering()  # show where in Keras it fails
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 1)).astype("float32"))
    ).batch(8)
    if os.environ.get("DISTRIBUTED_INPUT"):
        data = strategy.experimental_distribute_dataset(data)
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=2)
    print("fit finished", flush=True)


def launch_two_workers(timeout_s: float = 120.0) -> list[tuple[int | None, str]]:
    """Start both workers, wait for them, return (exit status, last error line) per worker."""
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    logs = Path(tempfile.mkdtemp(prefix="multi_worker_fit-"))
    workers = []
    try:
        for index, port in enumerate(ports):
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
                "TF_CPP_MIN_LOG_LEVEL": "1",
            }
            worker = ServerProcess(
                [sys.executable, "-m", "benchmarks.multi_worker_fit", "--worker"],
                port_open("127.0.0.1", port),
                logs / f"worker{index}.log",
                env=env,
                ready_timeout_s=timeout_s,
                name=f"worker {index}",
            )
            workers.append(worker.start())
        results = []
        for worker in workers:
            try:
                status = worker.process.wait(timeout_s)
            except Exception:  # noqa: BLE001 - a hung worker is a result too
                status = None
            text = worker.log_path.read_text(errors="replace")
            errors = [line for line in text.splitlines() if "Error" in line or "finished" in line]
            results.append((status, errors[-1] if errors else text[-300:]))
        return results
    finally:
        for worker in workers:
            worker.stop(grace_s=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one worker (reads TF_CONFIG)")
    args = parser.parse_args()
    if args.worker:
        fit_one_worker()
        return
    import keras
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}")
    for index, (status, line) in enumerate(launch_two_workers()):
        print(f"worker {index}: exit {status}: {line}")


if __name__ == "__main__":
    main()
