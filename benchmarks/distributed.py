"""tf.distribute on loopback workers: step times of train_distributed, and Keras fit failing.

`bench_distributed` (`python -m benchmarks distributed [--steps 12]
[--global-batch 64]`) runs one epoch of `train_distributed` on a fake feature
store (random float16 features, random 12-18 token captions, the default model
sizes) in fresh processes per setting and reports the median step time after
the first two steps (compilation): one process at the global batch and at half
of it, two MultiWorkerMirroredStrategy workers on 127.0.0.1 sharing the global
batch, and one process in each mixed `train.precision`. Every process gets one
intra-op thread, so the two workers do not steal each other's cores: two
workers at the global batch against one process at half of it differ by the
communication (the gradients' all-reduce over loopback and the workers'
synchronisation), per step.

`bench_multi_worker_fit` reproduces why the distributed train stage runs its
own loop (captioning.training.distributed) instead of `fit`: with two workers,
Keras 3 `fit` fails when it reduces values across workers (tensorflow#72388,
keras-team/keras#20585; with TensorFlow 2.21 and Keras 3.15 already on the
first batch, "Attempt to convert a value (PerReplica:{...})"). It reports each
worker's exit status and the last error line of its log. `DISTRIBUTED_INPUT=1`
passes a dataset distributed by the strategy instead, which fails the same way.
Both start their workers as `python -m benchmarks.distributed ROLE ...`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Result
from captioning.server_process import ServerProcess, free_port, port_open

REPO_ROOT = Path(__file__).resolve().parents[1]  # the workers import `benchmarks` from there
TIMEOUT_S = 600
QUICK_STEPS, QUICK_BATCH = 4, 16


def launch(role_args: list[str], workers: int, logs: Path, timeout_s: float = TIMEOUT_S) -> list:
    """Start `workers` processes of this module (TF_CONFIG for two or more), wait for them.

    Returns (exit status or None when it hung, log text) per worker.
    """
    ports = [free_port() for _ in range(workers)]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    try:
        for index in range(workers):
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            if workers > 1:
                task = {"type": "worker", "index": index}
                env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})
            command = [sys.executable, "-m", "benchmarks.distributed", *role_args]
            ready = port_open("127.0.0.1", ports[index]) if workers > 1 else lambda: True
            process = ServerProcess(command, ready, logs / f"worker{index}.log", env=env, cwd=REPO_ROOT,
                                    ready_timeout_s=timeout_s, name=f"worker {index}")  # fmt: skip
            processes.append(process.start())
        out = []
        for process in processes:
            try:
                status = process.process.wait(timeout_s)
            except Exception:  # noqa: BLE001 - a hung worker is a result too
                status = None
            out.append((status, process.log_path.read_text(errors="replace")))
        return out
    finally:
        for process in processes:
            process.stop(grace_s=2)


# ----------------------------------------------------------------------------- step times


def write_data(root: Path, images: int, vocab_size: int) -> None:
    """A fake store of `images` images, one caption each for train, 32 of them for val."""
    from benchmarks.workspace import fake_tokens, write_fake_store
    from captioning.data.text import Vocabulary
    from captioning.features import FeatureStore

    write_fake_store(root / "features", images)
    ids = np.asarray(FeatureStore(root / "features").index.image_id, dtype=np.int64)
    rng, tokens = np.random.default_rng(0), root / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    words = " ".join(f"w{i}" for i in range(vocab_size))
    (tokens / "vocab.json").write_text(Vocabulary.build([words], vocab_size).to_json())
    np.save(tokens / "train.npy", fake_tokens(len(ids), vocab_size, rng))
    np.save(tokens / "train_image_ids.npy", ids)
    np.save(tokens / "val.npy", fake_tokens(32, vocab_size, rng))
    np.save(tokens / "val_image_ids.npy", ids[:32])


def step_worker(data: Path, out: Path, params: dict) -> None:
    """One process: an epoch of train_distributed, printing the median step time."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    from benchmarks.harness import BatchClock
    from captioning.config import TrainParams, from_dict
    from captioning.data.text import Vocabulary
    from captioning.features import FeatureStore
    from captioning.training.batches import CaptionSet
    from captioning.training.distributed import train_distributed

    clock, start = BatchClock(), time.perf_counter()
    train_distributed(
        FeatureStore(data / "features"),
        Vocabulary.from_json((data / "tokens" / "vocab.json").read_text()),
        CaptionSet.load(data / "tokens", "train"), CaptionSet.load(data / "tokens", "val"),
        from_dict(TrainParams, "train", params),
        {"image_size": 299, "extractor_weights": "none", "extractor_seed": 0},
        out / "checkpoints", out / "history.csv", callbacks=[clock],
    )  # fmt: skip
    steps = np.diff([start, *clock.ends])[2:]
    if len(steps):
        print("step_s", json.dumps(float(np.median(steps))), flush=True)


def bench_distributed(ws) -> Result:
    steps = QUICK_STEPS if ws.quick else ws.options.steps
    batch = QUICK_BATCH if ws.quick else ws.options.global_batch
    data = ws.root / "distributed-data"
    write_data(data, steps * batch, ws.vocab_size)
    base = {  # one epoch of one pass over the data: `steps` steps of the global batch
        "budget_pairs": steps * batch, "epoch_pairs": steps * batch, "batch_size": batch,
        "captions_per_image": 0, "select_by": "val_loss", "distribute": "mirrored",
    }  # fmt: skip
    settings = {
        "one process, global batch": (base, 1),
        "one process, half batch": ({**base, "batch_size": batch // 2}, 1),
        "two workers, global batch": ({**base, "distribute": "multi_worker"}, 2),
        "one process, mixed_bfloat16": ({**base, "precision": "mixed_bfloat16"}, 1),
        "one process, mixed_float16": ({**base, "precision": "mixed_float16"}, 1),
    }
    result = Result(f"distributed: ms per step, global batch {batch}, {steps} steps, 1 thread each")
    for index, (name, (params, workers)) in enumerate(settings.items()):
        out = ws.root / f"distributed-run{index}"
        (_, log), *_ = launch(["step", str(data), str(out), json.dumps(params)], workers, out)
        lines = [line for line in log.splitlines() if line.startswith("step_s ")]
        if not lines:
            raise RuntimeError(f"{name}: no step time in the chief's log:\n{log[-3000:]}")
        result.add(name, 1000 * float(lines[-1].split()[1]), "ms/step")
    result.add(
        "two workers minus one process at half batch (communication)",
        result.figures["two workers, global batch"] - result.figures["one process, half batch"],
        "ms/step",
    )
    return result


# ----------------------------------------------------------------------------- Keras fit


def fit_worker() -> None:
    """One worker: a two-layer model, `fit` for two steps with a scalar metric."""
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    keras.config.disable_traceback_filtering()  # show where in Keras it fails
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    if os.environ.get("DISTRIBUTED_INPUT"):
        data = strategy.experimental_distribute_dataset(data)
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=2)
    print("fit finished", flush=True)


def bench_multi_worker_fit(ws) -> Result:
    import keras
    import tensorflow as tf

    result = Result(
        f"multi_worker_fit: Keras {keras.__version__} fit under MultiWorkerMirroredStrategy, "
        f"two workers on 127.0.0.1, TensorFlow {tf.__version__}"
    )
    for index, (status, log) in enumerate(launch(["fit"], 2, ws.root / "fit", timeout_s=120)):
        result.add(f"worker {index} exit status (-1: hung)", -1 if status is None else status, "")
        errors = [line for line in log.splitlines() if "Error" in line or "finished" in line]
        result.notes.append(f"worker {index}: {errors[-1] if errors else log[-300:]}")
    return result


if __name__ == "__main__":
    if sys.argv[1] == "step":
        step_worker(Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))
    else:
        fit_worker()
