"""One training process for tests/test_distributed.py: `python tests/distributed_worker.py ...`.

Runs in its own process because the things under test are fixed when
TensorFlow starts: the number of logical CPU devices (`--devices`) and the
cluster a MultiWorkerMirroredStrategy joins (TF_CONFIG). Trains on the
fixture's data (`--data`, written by the test), then saves the trained
variables of the last epoch to `--weights` (a test artefact, not an output of
training). `--kill-at EPOCH:STEP` makes the chief SIGKILL itself after that
step of that epoch (1-based), as a crash would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, help="folder with features/, tokens/, references.json"
    )
    parser.add_argument("--out", required=True, help="this process's checkpoints/ and history.csv")
    parser.add_argument(
        "--weights", required=True, help="where to save the last epoch's weights (.npz)"
    )
    parser.add_argument("--params", default="{}", help="TrainParams overrides as JSON")
    parser.add_argument("--devices", type=int, default=1, help="logical CPU devices")
    parser.add_argument("--kill-at", default="", help="EPOCH:STEP after which the chief dies")
    return parser.parse_args()


def split_cpu(devices: int) -> None:
    """Present the host CPU as `devices` logical devices (before TensorFlow uses it)."""
    import tensorflow as tf

    if devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(devices)]
        )


def main() -> None:
    args = parse_args()
    split_cpu(args.devices)
    import keras
    import numpy as np

    from captioning.config import TrainParams, from_dict
    from captioning.data.text import Vocabulary
    from captioning.features import FeatureStore
    from captioning.training.batches import CaptionSet
    from captioning.training.distributed import trainer

    class KillAt(keras.callbacks.Callback):
        """A crash after step `step` of epoch `epoch` (chief only: callbacks run there)."""

        def __init__(self, epoch: int, step: int):
            super().__init__()
            self.epoch, self.step, self.current = epoch, step, 0

        def on_epoch_begin(self, epoch, logs=None):
            self.current = epoch + 1

        def on_epoch_end(self, epoch, logs=None):
            self.current = epoch + 2  # the custom loop has no on_epoch_begin

        def on_train_batch_end(self, batch, logs=None):
            if (self.current or 1, batch + 1) == (self.epoch, self.step):
                os.kill(os.getpid(), signal.SIGKILL)

    class Records(keras.callbacks.Callback):
        """Stands in for the MLflow logger: a line per epoch in this process's folder."""

        def on_epoch_end(self, epoch, logs=None):
            with open(Path(args.out) / "records.jsonl", "a") as fh:
                fh.write(json.dumps({"epoch": epoch + 1, **logs}) + "\n")

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = from_dict(TrainParams, "train", json.loads(args.params))
    references = {int(k): v for k, v in json.loads((data / "references.json").read_text()).items()}
    callbacks = [Records()]
    if args.kill_at:
        callbacks.append(KillAt(*map(int, args.kill_at.split(":"))))
    model, summary = trainer(params)(
        FeatureStore(data / "features"),
        Vocabulary.from_json((data / "tokens" / "vocab.json").read_text()),
        CaptionSet.load(data / "tokens", "train"),
        CaptionSet.load(data / "tokens", "val"),
        params,
        json.loads((data / "features" / "extractor.json").read_text()),
        out / "checkpoints",
        out / "history.csv",
        callbacks=callbacks,
        val_references=references,
    )
    last = out / "checkpoints" / "last.weights.h5"
    if last.exists():  # the chief's last epoch; a worker's model already holds it
        model.load_weights(last)
    np.savez(args.weights, *model.get_weights())
    print("summary", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
