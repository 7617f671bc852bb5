"""Training: stream (features, caption) batches from disk and fit the captioner.

Feature batches are gathered from the memory-mapped feature store per batch,
so memory stays flat however large the data set is. Each epoch the caption
pairs are shuffled with a seed derived from (seed, epoch), which keeps a
resumed run on the same batches as an uninterrupted one. After every epoch the
weights, the optimiser state and the early-stopping state are checkpointed;
`fit_captioner` picks up from the last completed epoch when the checkpoint was
made with the same settings, and ends with the best weights by val loss.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioning.config import TrainParams
from captioning.features import FeatureStore
from captioning.model import Captioner, ModelConfig, build_captioner
from captioning.text import PAD_ID, Vocabulary


@dataclasses.dataclass(frozen=True)
class CaptionSet:
    """Encoded captions of one split and the image each belongs to."""

    tokens: np.ndarray  # (M, T) int32
    image_ids: np.ndarray  # (M,) int64

    @classmethod
    def load(cls, tokens_dir: str | Path, split: str) -> CaptionSet:
        tokens_dir = Path(tokens_dir)
        tokens = np.load(tokens_dir / f"{split}.npy", mmap_mode="r")
        ids = np.load(tokens_dir / f"{split}_image_ids.npy")
        if len(tokens) != len(ids):
            raise ValueError(f"{tokens_dir}: {split} has {len(tokens)} captions but {len(ids)} ids")
        return cls(tokens, ids)

    def __len__(self) -> int:
        return len(self.image_ids)


def caption_batches(
    store: FeatureStore,
    captions: CaptionSet,
    batch_size: int,
    seed: int | None,
    epoch_offset: int = 0,
) -> tf.data.Dataset:
    """(features (B, L, F) float16, tokens (B, T') int32) batches, reshuffled every epoch.

    seed None keeps file order (validation). Each batch is cut to its longest
    caption (rounded up to a multiple of 8) so the time loop does not run over
    padding.
    """
    epoch = [epoch_offset]
    num_loc, feat_dim = store.feature_shape

    lengths = (np.asarray(captions.tokens) != PAD_ID).sum(axis=1)  # (M,) one pass, small

    def generate():
        order = np.arange(len(captions))
        if seed is None:
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        else:
            rng = np.random.default_rng([seed, epoch[0]])
            rng.shuffle(order)
            epoch[0] += 1
            batches = _length_buckets(order, lengths, batch_size, rng)
        for rows in batches:
            rows = np.sort(rows)  # sorted: friendlier to the mmap
            tokens = np.asarray(captions.tokens[rows])
            width = int((tokens != PAD_ID).sum(axis=1).max())
            # Round up to a multiple of 8: XLA compiles once per shape, so a few widths.
            width = min(-(-width // 8) * 8, tokens.shape[1])
            yield store.get(captions.image_ids[rows]), tokens[:, :width]

    signature = (
        tf.TensorSpec((None, num_loc, feat_dim), tf.float16),
        tf.TensorSpec((None, None), tf.int32),
    )
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(2)


def _length_buckets(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng) -> list:
    """Cut shuffled rows into batches of captions of similar length.

    Within windows of 20 batches rows are sorted by length, then the batches
    are shuffled. Batches are cut to their longest caption, so this cuts the
    time steps spent on padding (the time loop is most of the cost) while
    every epoch still sees every caption once, in a seeded random order.
    """
    window = batch_size * 20
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def settings_fingerprint(*parts: object) -> str:
    """A short hash of anything JSON-serialisable; checkpoints resume only on a match."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def store_fingerprint(store: FeatureStore) -> str:
    """Identity of a feature store: its index and extractor files, hashed."""
    digest = hashlib.sha256()
    for name in ("index.parquet", "extractor.json"):
        path = store.root / name
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class EpochCheckpoint(keras.callbacks.Callback):
    """Per-epoch checkpoint + early stopping on val loss, both resumable.

    Keeps `last.weights.h5`, `best.weights.h5`, the optimiser variables and a
    `state.json`; writes are atomic so a kill mid-save leaves the previous
    epoch's checkpoint intact.
    """

    def __init__(
        self,
        directory: Path,
        history_csv: Path,
        fingerprint: str,
        patience: int,
        state: dict | None = None,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.history_csv = Path(history_csv)
        self.fingerprint = fingerprint
        self.patience = patience
        self.state = state or {
            "epoch": 0,
            "best_val_loss": float("inf"),
            "best_epoch": 0,
            "wait": 0,
            "history": [],
        }

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        val_loss = float(logs.get("val_loss", logs.get("loss")))
        self.directory.mkdir(parents=True, exist_ok=True)
        if val_loss < self.state["best_val_loss"]:
            self.state.update(best_val_loss=val_loss, best_epoch=epoch + 1, wait=0)
            _atomic_save_weights(self.model, self.directory / "best.weights.h5")
        else:
            self.state["wait"] += 1
        _atomic_save_weights(self.model, self.directory / "last.weights.h5")
        _save_optimizer(self.model.optimizer, self.directory / "optimizer.npz")
        self.state["epoch"] = epoch + 1
        self.state["history"].append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}})
        _write_history(self.history_csv, self.state["history"])
        _atomic_write(
            self.directory / "state.json",
            json.dumps({**self.state, "fingerprint": self.fingerprint}, indent=2),
        )
        if self.state["wait"] >= self.patience:
            self.model.stop_training = True


def fit_captioner(
    store: FeatureStore,
    vocabulary: Vocabulary,
    train: CaptionSet,
    val: CaptionSet,
    params: TrainParams,
    extractor: dict,
    checkpoint_dir: str | Path,
    history_csv: str | Path,
    callbacks: list[keras.callbacks.Callback] = (),
    on_resume: Callable[[int], None] | None = None,
) -> tuple[Captioner, dict]:
    """Train (or resume) and return the best model by val loss and a summary.

    `extractor`: the ModelConfig fields naming the feature extractor
    (image_size, extractor_weights, extractor_seed, extractor_digest).
    """
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        # Bit-identical reruns, at about 3x the step time under XLA on CPU.
        tf.config.experimental.enable_op_determinism()
    num_loc, feat_dim = store.feature_shape
    config = ModelConfig(
        vocab_size=len(vocabulary),
        embedding_dim=params.embedding_dim,
        units=params.units,
        attention_units=params.attention_units,
        encoder_dim=params.encoder_dim,
        feature_dim=feat_dim,
        num_locations=num_loc,
        attention_penalty=params.attention_penalty,
        **extractor,
    )
    model = build_captioner(config, vocabulary, seed=params.seed)
    mean, std = store.feature_stats("train")
    model.encoder.set_feature_stats(mean, std)
    model.compile(
        optimizer=keras.optimizers.Adam(params.learning_rate), jit_compile=params.jit_compile
    )

    checkpoint_dir = Path(checkpoint_dir)
    fingerprint = settings_fingerprint(
        dataclasses.asdict(params),
        extractor,
        vocabulary.words,
        len(train),
        len(val),
        store_fingerprint(store),
    )
    state = _resume_state(checkpoint_dir, fingerprint)
    initial_epoch = 0
    if state:
        model.load_weights(checkpoint_dir / "last.weights.h5")
        _load_optimizer(model, checkpoint_dir / "optimizer.npz")
        initial_epoch = state["epoch"]
        if on_resume:
            on_resume(initial_epoch)
    checkpoint = EpochCheckpoint(
        checkpoint_dir, Path(history_csv), fingerprint, params.early_stopping_patience, state
    )
    done = state and (
        state["epoch"] >= params.epochs or state["wait"] >= params.early_stopping_patience
    )
    if not done:
        model.fit(
            caption_batches(store, train, params.batch_size, params.seed, initial_epoch),
            validation_data=caption_batches(store, val, params.batch_size, None),
            epochs=params.epochs,
            initial_epoch=initial_epoch,
            callbacks=[checkpoint, *callbacks],
            verbose=2,
        )
    _write_history(history_csv, checkpoint.state["history"])
    model.load_weights(checkpoint_dir / "best.weights.h5")
    summary = {
        "epochs_run": checkpoint.state["epoch"],
        "best_epoch": checkpoint.state["best_epoch"],
        "best_val_loss": checkpoint.state["best_val_loss"],
        "resumed_from_epoch": initial_epoch,
    }
    return model, summary


def save_model(model: Captioner, path: str | Path) -> None:
    """Write the `.keras` file atomically (Keras insists on the suffix, hence the name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


# -- checkpoint plumbing --------------------------------------------------------
def _resume_state(directory: Path, fingerprint: str) -> dict | None:
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_weights(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(".tmp." + path.name)
    model.save_weights(tmp)
    os.replace(tmp, path)


def _save_optimizer(optimizer: keras.optimizers.Optimizer, path: Path) -> None:
    tmp = path.with_name(".tmp." + path.name)
    with open(tmp, "wb") as fh:
        np.savez(fh, *[v.numpy() for v in optimizer.variables])
    os.replace(tmp, path)


def _load_optimizer(model: keras.Model, path: Path) -> None:
    model.optimizer.build(model.trainable_variables)
    with np.load(path) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(model.optimizer.variables):
        raise ValueError(f"{path}: optimiser state does not match the model")
    for variable, value in zip(model.optimizer.variables, values, strict=True):
        variable.assign(value)


def _write_history(path: str | Path, rows: list[dict]) -> None:
    """Per-epoch metrics as CSV (the DVC plots source), rewritten whole each epoch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else ["epoch"]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
