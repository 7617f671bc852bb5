"""Per-epoch checkpoints, resuming, and the training history.

After every epoch `EpochCheckpoint` writes the weights, the optimiser state,
the early-stopping state and the history (atomically: a kill mid-save leaves
the previous epoch's checkpoint intact); the engines write the history as a
CSV table when the run ends (`write_history`), while DVCLive shows it live. A run resumes from the last completed
epoch only when its fingerprint (settings, data, code) matches the
checkpoint's.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from captioning.atomic_files import atomic_path, atomic_write
from captioning.config import TrainParams
from captioning.data.text import Vocabulary
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner
from captioning.training.batches import CaptionSet
from captioning.training.budget import StoppingRule, TrainingBudget


def settings_fingerprint(*parts: object) -> str:
    """A short hash of anything JSON-serialisable; checkpoints resume only on a match."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_fingerprint() -> str:
    """Hash of the modules that decide what training computes: a resume needs the same code.

    The model, training and evaluation subpackages (the val captions are scored
    there), config and its checks (they are decoded with evaluate's defaults)
    and the data sources' own scorers: the truth scorer, the generated sources
    and their grammars.
    """
    package = Path(__file__).resolve().parent.parent
    files = [package / "config.py", package / "param_checks.py"]
    data = package / "data"
    files += [data / name for name in ("scorers.py", "sources.py", "synthetic.py", "drawing.py")]
    files += sorted(data.glob("demo*.py")) + sorted(data.glob("scenes*.py"))
    for folder in ("model", "training", "evaluation"):
        files += sorted((package / folder).glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def store_fingerprint(store: FeatureStore) -> str:
    """Identity of a feature store: its index and extractor files, hashed."""
    digest = hashlib.sha256()
    for name in ("index.parquet", "extractor.json"):
        path = store.root / name
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(
    params: TrainParams,
    extractor: dict,
    vocabulary: Vocabulary,
    train: CaptionSet,
    val: CaptionSet,
    store: FeatureStore,
    val_references: dict | None,
    val_scorer: object | None,
) -> str:
    """What a checkpoint must match to be resumed: settings, data, code (not the strategy)."""
    return settings_fingerprint(
        # N workers resume on M, and one process on either.
        dataclasses.asdict(dataclasses.replace(params, distribute="none")), extractor,
        vocabulary.words, len(train), len(val), store_fingerprint(store),
        sorted(val_references or {}), val_scorer is not None, code_fingerprint(),
    )  # fmt: skip


class EpochCheckpoint(keras.callbacks.Callback):
    """Per-epoch checkpoint + early stopping by `rule`, both resumable.

    Keeps `last.weights.h5`, `best.weights.h5` (the epoch with the best single
    value of the monitored metric), the optimiser variables and a `state.json`
    with the history; writes are atomic so a kill mid-save leaves the previous
    epoch's checkpoint intact. Adds `pairs_seen` and the smoothed metric to the
    epoch logs (so the MLflow logger after it records them).
    """

    def __init__(
        self,
        directory: Path,
        fingerprint: str,
        rule: StoppingRule,
        budget: TrainingBudget,
        state: dict | None = None,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.rule = rule
        self.budget = budget
        self.state = state or {
            "epoch": 0,
            "monitor": rule.monitor,
            "best": None,
            "best_epoch": 0,
            "stopped": False,
            "history": [],
        }

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        rule = self.rule
        if rule.monitor not in logs:
            raise KeyError(f"early stopping monitors {rule.monitor!r}, not in {sorted(logs)}")
        value = float(logs[rule.monitor])
        self.directory.mkdir(parents=True, exist_ok=True)
        if rule.improves(value, self.state["best"]):
            self.state.update(best=value, best_epoch=epoch + 1)
            _save_weights(self.model, self.directory / "best.weights.h5")
        _save_weights(self.model, self.directory / "last.weights.h5")
        _save_optimizer(self.model.optimizer, self.directory / "optimizer.npz")
        values = [row[rule.monitor] for row in self.state["history"]] + [value]
        logs["pairs_seen"] = self.budget.pairs_seen(epoch + 1)
        logs["passes"] = self.budget.passes(epoch + 1)
        logs[rule.smoothed_name] = rule.smoothed(values)
        # At the budget's last epoch the run ends anyway: that is not stopping early.
        last = epoch + 1 >= self.budget.epochs
        self.state["stopped"] = not last and rule.stops(values, self.budget.pairs_seen(1))
        self.state["epoch"] = epoch + 1
        row = {k: float(v) for k, v in logs.items()}
        self.state["history"].append({"epoch": epoch + 1, **row})
        atomic_write(
            self.directory / "state.json",
            json.dumps({**self.state, "fingerprint": self.fingerprint}, indent=2),
        )
        if self.state["stopped"]:
            self.model.stop_training = True

    def summary(self, initial_epoch: int) -> dict:
        """What the run did: epochs, pairs, the best epoch, whether it stopped or was still improving."""
        state, rule = self.state, self.rule
        values = [row[rule.monitor] for row in state["history"]]
        return {
            "epochs_run": state["epoch"],
            "pairs_seen": self.budget.pairs_seen(state["epoch"]),
            "best_epoch": state["best_epoch"],
            f"best_{rule.monitor}": state["best"],
            "stopped_early": state["stopped"],
            "still_improving": not state["stopped"] and rule.still_improving(values),
            "resumed_from_epoch": initial_epoch,
        }


def save_model(model: Captioner, path: str | Path) -> None:
    """Write the `.keras` file atomically (Keras insists on the suffix)."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


# -- checkpoint plumbing --------------------------------------------------------
def resume_state(directory: Path, fingerprint: str) -> dict | None:
    state_file = directory / "state.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    if state.pop("fingerprint", None) != fingerprint:
        return None  # settings or data changed: a resumed run would not be this run
    needed = ("last.weights.h5", "best.weights.h5", "optimizer.npz")
    if not all((directory / name).exists() for name in needed):
        return None
    return state


def restore_checkpoint(
    model: Captioner,
    directory: Path,
    state: dict | None,
    on_resume: Callable[[int], None] | None,
) -> int:
    """Load the last epoch's weights and optimiser state when resuming; the epoch to start at."""
    if not state or not state["epoch"]:
        return 0
    model.load_weights(directory / "last.weights.h5")
    _load_optimizer(model, directory / "optimizer.npz")
    if on_resume:
        on_resume(state["epoch"])
    return state["epoch"]


def finished(state: dict | None, budget: TrainingBudget) -> bool:
    """Whether a resumed run already ran its whole budget or stopped early."""
    return bool(state) and (state["epoch"] >= budget.epochs or state.get("stopped", False))


def _save_weights(model: keras.Model, path: Path) -> None:
    with atomic_path(path, suffix=".weights.h5") as tmp:  # Keras checks the suffix
        model.save_weights(tmp)


def _save_optimizer(optimizer: keras.optimizers.Optimizer, path: Path) -> None:
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, *[v.numpy() for v in optimizer.variables])


def _load_optimizer(model: keras.Model, path: Path) -> None:
    model.optimizer.build(model.trainable_variables)
    with np.load(path) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(model.optimizer.variables):
        raise ValueError(f"{path}: optimiser state does not match the model")
    for variable, value in zip(model.optimizer.variables, values, strict=True):
        variable.assign(value)


def read_history(path: str | Path) -> list[dict]:
    """The rows `write_history` wrote, numbers as floats (epoch as int)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [
        {k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v != ""} for row in rows
    ]


def write_history(path: str | Path, rows: list[dict]) -> None:
    """Per-epoch metrics as CSV (the DVC plots source), rewritten whole each epoch."""
    fields = list(rows[0]) if rows else ["epoch"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
