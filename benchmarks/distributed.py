"""Step time of captioning.training.distributed: one process against two workers on loopback, and precisions.

    python -m benchmarks.distributed [--steps 12] [--images 1024]

On a fake feature store (benchmarks.workspace: random float16 features,
random 12-18 token captions) with the default model sizes, each setting runs
one epoch of `train_distributed` in fresh processes and reports the median
step time after the first two steps (compilation): one process at the global
batch and at half of it, two MultiWorkerMirroredStrategy workers on 127.0.0.1
sharing the global batch, and one process in each `train.precision`. Every
process gets one intra-op thread, so the two workers do not steal each
other's cores: two workers at the global batch against one process at half
of it differ by the communication (the gradients' all-reduce over loopback
and the workers' synchronisation), per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from captioning.server_process import ServerProcess, free_port, port_open

TIMEOUT_S = 600


def write_data(root: Path, images: int) -> None:
    """A fake store of `images` images, one caption each for train, 32 of them for val."""
    from benchmarks.workspace import VOCAB_SIZE, fake_tokens, write_fake_store
    from captioning.data.text import Vocabulary
    from captioning.features import FeatureStore

    write_fake_store(root / "features", images)
    ids = np.asarray(FeatureStore(root / "features").index.image_id, dtype=np.int64)
    rng = np.random.default_rng(0)
    tokens = root / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(VOCAB_SIZE)]
    (tokens / "vocab.json").write_text(Vocabulary.build([" ".join(words)], VOCAB_SIZE).to_json())
    np.save(tokens / "train.npy", fake_tokens(len(ids), VOCAB_SIZE, rng))
    np.save(tokens / "train_image_ids.npy", ids)
    np.save(tokens / "val.npy", fake_tokens(32, VOCAB_SIZE, rng))
    np.save(tokens / "val_image_ids.npy", ids[:32])


def run_worker(data: Path, out: Path, params: dict) -> None:
    """One process: an epoch of train_distributed, printing the median step time."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import keras

    from captioning.config import TrainParams, from_dict
    from captioning.data.text import Vocabulary
    from captioning.features import FeatureStore
    from captioning.training.batches import CaptionSet
    from captioning.training.distributed import train_distributed

    class StepTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    timer = StepTimes()
    params = from_dict(TrainParams, "train", params)
    vocabulary = Vocabulary.from_json((data / "tokens" / "vocab.json").read_text())
    train_distributed(
        FeatureStore(data / "features"),
        vocabulary,
        CaptionSet.load(data / "tokens", "train"),
        CaptionSet.load(data / "tokens", "val"),
        params,
        {"image_size": 299, "extractor_weights": "none", "extractor_seed": 0},
        out / "checkpoints",
        out / "history.csv",
        callbacks=[timer],
    )
    steps = np.diff(timer.times)[2:]
    if len(steps):
        print("step_s", json.dumps(float(np.median(steps))), flush=True)


def measure(data: Path, root: Path, name: str, params: dict, workers: int = 1) -> float:
    """Median step seconds of one setting (the chief's view when there are workers)."""
    ports = [free_port() for _ in range(workers)]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    try:
        for index in range(workers):
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            if workers > 1:
                task = {"type": "worker", "index": index}
                env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})
            out = root / name / f"worker{index}"
            command = [sys.executable, "-m", "benchmarks.distributed", "--worker", str(data)]
            command += [str(out), json.dumps(params)]
            ready = port_open("127.0.0.1", ports[index]) if workers > 1 else lambda: True
            process = ServerProcess(command, ready, out.with_suffix(".log"), env=env)
            processes.append(process.start())
        for process in processes:
            process.process.wait(TIMEOUT_S)
        log = processes[0].log_path.read_text()
        lines = [line for line in log.splitlines() if line.startswith("step_s ")]
        if not lines:
            raise RuntimeError(processes[0].tail())
        return float(lines[-1].split()[1])
    finally:
        for process in processes:
            process.stop(grace_s=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="steps per measured epoch")
    parser.add_argument("--batch", type=int, default=64, help="global batch (train.batch_size)")
    parser.add_argument(
        "--worker", nargs=3, metavar=("DATA", "OUT", "PARAMS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        data, out, params = args.worker
        run_worker(Path(data), Path(out), json.loads(params))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    data = root / "data"
    write_data(data, args.steps * args.batch)
    base = {
        # One epoch of one pass over the data: args.steps steps of the global batch.
        "budget_pairs": args.steps * args.batch,
        "epoch_pairs": args.steps * args.batch,
        "batch_size": args.batch,
        "captions_per_image": 0,
        "select_by": "val_loss",
        "distribute": "mirrored",
    }
    half = {**base, "batch_size": args.batch // 2}
    settings = [
        ("one process, global batch", base, 1),
        ("one process, half batch", half, 1),
        ("two workers, global batch", {**base, "distribute": "multi_worker"}, 2),
        ("one process, mixed_bfloat16", {**base, "precision": "mixed_bfloat16"}, 1),
        ("one process, mixed_float16", {**base, "precision": "mixed_float16"}, 1),
    ]
    print(f"global batch {args.batch}, {args.steps} steps, one intra-op thread per process")
    for index, (name, params, workers) in enumerate(settings):
        seconds = measure(data, root, f"run{index}", params, workers)
        print(f"{name:32s} {seconds * 1000:8.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
