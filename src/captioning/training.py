"""Training: stream (features, caption) batches from disk and fit the captioner.

Feature batches are gathered from the memory-mapped feature store per batch,
so memory stays flat however large the data set is. Each epoch the caption
pairs are shuffled with a seed derived from (seed, epoch), which keeps a
resumed run on the same batches as an uninterrupted one. After every epoch the
weights, the optimiser state and the early-stopping state are checkpointed;
`fit_captioner` picks up from the last completed epoch when the checkpoint was
made with the same settings, and ends with the best weights by the selection
metric: val CIDEr of greedy captions for a fixed val sample (the default), or
val loss. Val loss mostly measures how well the model guesses the wording of
one of five references; CIDEr measures the caption it actually writes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioning import metrics
from captioning.atomic_files import atomic_path, atomic_write
from captioning.config import EvaluateParams, TrainParams
from captioning.data.demo_captions import caption_correct
from captioning.decode import CaptionDecoder
from captioning.features import FeatureStore
from captioning.model import Captioner, ModelConfig, build_captioner, decoder_settings
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
    captions_per_image: int | None = None,
    epochs: int | None = 1,
) -> tf.data.Dataset:
    """`caption_arrays` as a prefetching tf.data pipeline (what `fit` reads).

    Each new iterator continues with the next epochs (a new shuffle), as
    iterating a Keras dataset once per epoch expects.
    """
    num_loc, feat_dim = store.feature_shape
    token_shape = (None, captions_per_image, None) if captions_per_image else (None, None)
    signature = (
        tf.TensorSpec((None, num_loc, feat_dim), tf.float16),
        tf.TensorSpec(token_shape, tf.int32),
    )
    first_epochs = itertools.count(epoch_offset, epochs or 0)  # of each iterator, in turn

    def one_iterator():
        start = next(first_epochs)
        yield from caption_arrays(
            store, captions, batch_size, seed, start, captions_per_image, epochs
        )

    return tf.data.Dataset.from_generator(one_iterator, output_signature=signature).prefetch(2)


def caption_arrays(
    store: FeatureStore,
    captions: CaptionSet,
    batch_size: int,
    seed: int | None,
    epoch_offset: int = 0,
    captions_per_image: int | None = None,
    epochs: int | None = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches (features, tokens) from the feature store, reshuffled every epoch.

    `epochs` None repeats forever (training: pass `steps_per_epoch` to fit).

    captions_per_image None: (features (B, L, F) float16, tokens (B, T') int32),
    one row per caption, every caption once per epoch.

    captions_per_image K: image-major batches (features (n, L, F), tokens
    (n, K, T')) of n = round(batch_size / K) images, each with K of its
    captions (a fresh random K each epoch when it has more, some repeated when
    it has fewer). An epoch is every image once. The encoder and the attention
    keys then run once per image instead of once per caption, and the feature
    store is read K times less.

    seed None keeps store order and every row (validation); with a seed, rows
    after the last full batch are left for the next epoch. Each batch is cut to its longest
    caption (rounded up to a multiple of 8) so the time loop does not run over
    padding.
    """
    plan = BatchPlan(captions, batch_size, captions_per_image)
    # One long-lived iterator for all epochs (`epochs` None): a generator dataset
    # that Keras re-creates each epoch blocks while the old one shuts down.
    if epochs is None:
        numbers = itertools.count(epoch_offset)
    else:
        numbers = range(epoch_offset, epoch_offset + epochs)
    for epoch in numbers:
        for units, rows in plan.epoch(seed, epoch):
            yield plan.read(store, units, rows)


class BatchPlan:
    """Which caption rows make up each batch of an epoch, and reading them.

    A batch is a set of units (captions, or images when `captions_per_image`
    is K) and their caption rows: (B,) for captions, (n, K) for images.
    """

    def __init__(self, captions: CaptionSet, batch_size: int, captions_per_image: int | None):
        self.captions = captions
        self.k = captions_per_image or None
        self.lengths = (np.asarray(captions.tokens) != PAD_ID).sum(axis=1)  # (M,) one pass, small
        if self.k:
            self.images, self.first_row, counts = np.unique(
                captions.image_ids, return_index=True, return_counts=True
            )
            order = np.argsort(captions.image_ids, kind="stable")
            self.rows_by_image = np.split(order, np.cumsum(counts)[:-1])
            self.per_batch = max(1, round(batch_size / self.k))
        else:
            self.per_batch = batch_size

    @property
    def units(self) -> int:
        return len(self.images) if self.k else len(self.captions)

    def epoch(self, seed: int | None, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(units, rows) of every batch of `epoch`: shuffled by (seed, epoch), or in order."""
        if seed is None:
            return [(units, self._rows(units, None)) for units in self._in_order()]
        return self._shuffled(np.random.default_rng([seed, epoch]))

    def read(self, store: FeatureStore, units: np.ndarray, rows: np.ndarray):
        """(features, tokens) of one batch, tokens cut to the batch's longest caption."""
        tokens = np.asarray(self.captions.tokens[rows.reshape(-1)])  # (B, T)
        width = int((tokens != PAD_ID).sum(axis=1).max())
        # Round up to a multiple of 8: XLA compiles once per shape, so a few widths.
        width = min(-(-width // 8) * 8, tokens.shape[1])
        tokens = tokens[:, :width].reshape(*rows.shape, width)
        ids = self.images[units] if self.k else self.captions.image_ids[rows]
        return store.get(ids), tokens

    def _in_order(self) -> list[np.ndarray]:
        """Validation: every unit once, captions in store order, images in caption-file order."""
        order = np.arange(self.units)
        if self.k:
            order = order[np.argsort(self.first_row, kind="stable")]
        return [order[i : i + self.per_batch] for i in range(0, len(order), self.per_batch)]

    def _shuffled(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        order = np.arange(self.units)
        rng.shuffle(order)
        if not self.k:
            batches = _length_buckets(order, self.lengths, self.per_batch, rng)
            return [(units, self._rows(units, None)) for units in batches]
        # Choose this epoch's K captions per image first, then group images by the
        # length of those captions: a batch is cut to its longest row.
        picked = np.empty((self.units, self.k), dtype=np.int64)
        picked[order] = self._rows(order, rng)  # (units, K), indexed by image
        batches = _length_buckets(order, self.lengths[picked].max(axis=1), self.per_batch, rng)
        return [(units, picked[units]) for units in batches]

    def _rows(self, units: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Caption rows of `units`: (B,) sorted captions, or (n, K) captions per image."""
        if not self.k:
            return np.sort(units)  # sorted: friendlier to the mmap
        picked = []
        for unit in units:
            rows = self.rows_by_image[unit]
            if rng is None:  # validation: the first K, cycling when there are fewer
                picked.append(np.resize(rows, self.k))
            elif len(rows) >= self.k:
                picked.append(rng.choice(rows, self.k, replace=False))
            else:
                picked.append(np.concatenate([rows, rng.choice(rows, self.k - len(rows))]))
        return np.stack(picked)


def steps_per_epoch(captions: CaptionSet, batch_size: int, captions_per_image: int | None) -> int:
    """Training batches `caption_batches` makes per epoch (full batches only)."""
    units, per_batch = len(captions), batch_size
    if captions_per_image:
        units = len(np.unique(captions.image_ids))
        per_batch = max(1, round(batch_size / captions_per_image))
    return max(1, units // per_batch)


def _length_buckets(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng) -> list:
    """Cut shuffled rows into batches of captions of similar length.

    Within windows of 20 batches rows are sorted by length, then the batches
    are shuffled. Batches are cut to their longest caption, so this cuts the
    time steps spent on padding (the time loop is most of the cost). The
    shuffled rows left over after the last full batch wait for the next epoch
    (different ones each time): a short batch would be one more shape for XLA
    to compile, which costs as much as many training steps.
    """
    if len(order) >= batch_size:
        order = order[: len(order) // batch_size * batch_size]
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


def code_fingerprint() -> str:
    """Hash of the modules that decide what training computes: a resume needs the same code.

    config is among them: the val captions are decoded with evaluate's defaults.
    """
    from captioning import config, decode, metrics, model, transformer

    digest = hashlib.sha256()
    for module in (model, transformer, decode, metrics, config):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def store_fingerprint(store: FeatureStore) -> str:
    """Identity of a feature store: its index and extractor files, hashed."""
    digest = hashlib.sha256()
    for name in ("index.parquet", "extractor.json"):
        path = store.root / name
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class EpochCheckpoint(keras.callbacks.Callback):
    """Per-epoch checkpoint + early stopping on `monitor`, both resumable.

    Keeps `last.weights.h5`, `best.weights.h5`, the optimiser variables and a
    `state.json`; writes are atomic so a kill mid-save leaves the previous
    epoch's checkpoint intact. `monitor` is a key of the epoch logs; losses are
    minimised, anything else (val_CIDEr) maximised.
    """

    def __init__(
        self,
        directory: Path,
        history_csv: Path,
        fingerprint: str,
        patience: int,
        state: dict | None = None,
        monitor: str = "val_loss",
    ):
        super().__init__()
        self.directory = Path(directory)
        self.history_csv = Path(history_csv)
        self.fingerprint = fingerprint
        self.patience = patience
        self.monitor = monitor
        self.sign = 1.0 if monitor.endswith("loss") else -1.0  # minimise sign * value
        self.state = state or {
            "epoch": 0,
            "monitor": monitor,
            "best": None,
            "best_epoch": 0,
            "wait": 0,
            "history": [],
        }

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(f"early stopping monitors {self.monitor!r}, not in {sorted(logs)}")
        value = float(logs[self.monitor])
        self.directory.mkdir(parents=True, exist_ok=True)
        best = self.state["best"]
        if best is None or self.sign * value < self.sign * best:
            self.state.update(best=value, best_epoch=epoch + 1, wait=0)
            _save_weights(self.model, self.directory / "best.weights.h5")
        else:
            self.state["wait"] += 1
        _save_weights(self.model, self.directory / "last.weights.h5")
        _save_optimizer(self.model.optimizer, self.directory / "optimizer.npz")
        self.state["epoch"] = epoch + 1
        self.state["history"].append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}})
        _write_history(self.history_csv, self.state["history"])
        atomic_write(
            self.directory / "state.json",
            json.dumps({**self.state, "fingerprint": self.fingerprint}, indent=2),
        )
        if self.state["wait"] >= self.patience:
            self.model.stop_training = True


class HeldOutLoss(keras.callbacks.Callback):
    """Each epoch: the model's metrics on the val batches, as `val_loss`, `val_ce`, ...

    Keras' own `validation_data` re-creates a generator-backed tf.data iterator
    every epoch, and tearing the old one down blocks the epoch for seconds on a
    small machine; these batches are read in the calling thread instead. Values
    are unweighted means over the batches.
    """

    def __init__(self, batches: Callable[[], Iterator], jit_compile: bool = True):
        super().__init__()
        self.batches = batches
        self.jit_compile = jit_compile
        self._fn = None
        self._for = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self._for is not self.model:
            self._fn = tf.function(self.model.batch_metrics, jit_compile=self.jit_compile)
            self._for = self.model
        values: dict[str, list[float]] = {}
        for features, tokens in self.batches():
            for name, value in self._fn((features, tokens)).items():
                values.setdefault(name, []).append(float(value))
        logs.update({f"val_{name}": float(np.mean(v)) for name, v in values.items()})


class ValCaptionScore(keras.callbacks.Callback):
    """Each epoch: greedy captions for a fixed val sample, scored; adds `val_CIDEr` to the logs.

    On the demo set (`objects` given) it also adds `val_object_accuracy`, the
    share of those captions that name every object right. Runs before the
    checkpoint callback, which can then select on it, and before the MLflow
    logger, which records it.
    """

    def __init__(
        self,
        store: FeatureStore,
        image_ids: np.ndarray,
        references: dict[int, list[str]],
        objects: dict[int, list[dict]] | None = None,
        max_len: int = EvaluateParams.max_len,
        batch_size: int = EvaluateParams.batch_size,
    ):
        super().__init__()
        missing = [int(i) for i in image_ids if int(i) not in references]
        if missing:
            raise ValueError(f"val sample images without references: {missing[:10]}")
        self.store = store
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.references = {int(i): references[int(i)] for i in self.image_ids}
        self.objects = objects
        self.max_len = max_len
        self.batch_size = batch_size
        self._decoder: CaptionDecoder | None = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self._decoder is None or self._decoder.model is not self.model:
            self._decoder = CaptionDecoder(self.model)
        decoded = self._decoder.decode(
            self.store.get(self.image_ids), "greedy", self.max_len, batch_size=self.batch_size
        )
        candidates = dict(zip(self.image_ids.tolist(), decoded.captions, strict=True))
        logs["val_CIDEr"] = metrics.score(self.references, candidates, ("CIDEr",)).corpus["CIDEr"]
        if self.objects is not None:
            logs["val_object_accuracy"] = float(
                np.mean(
                    [caption_correct(c, self.objects.get(i, [])) for i, c in candidates.items()]
                )
            )


class LearningRateLog(keras.callbacks.Callback):
    """Adds the learning rate the last step used to the epoch logs (and so to MLflow)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.model.optimizer.learning_rate)


def val_sample(val: CaptionSet, size: int, seed: int) -> np.ndarray:
    """A fixed, seeded sample of val image ids (sorted), the same every epoch and on resume."""
    ids = np.unique(val.image_ids)
    if size < len(ids):
        ids = np.sort(np.random.default_rng(seed).choice(ids, size, replace=False))
    return ids


def make_optimizer(params: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam with the scheduled learning rate and global-norm gradient clipping of `params`."""
    rate: float | keras.optimizers.schedules.LearningRateSchedule = params.learning_rate
    if params.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            params.learning_rate,
            decay_steps=max(1, params.epochs * steps_per_epoch),
            alpha=params.lr_min_fraction,
        )
    return keras.optimizers.Adam(rate, global_clipnorm=params.clip_norm or None)


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
    val_references: dict[int, list[str]] | None = None,
    val_objects: dict[int, list[dict]] | None = None,
) -> tuple[Captioner, dict]:
    """Train (or resume) and return the best model by `params.select_by` and a summary.

    `extractor`: the ModelConfig fields naming the feature extractor
    (image_size, extractor_weights, extractor_seed, extractor_digest).
    `val_references` (raw captions by image id) enable val CIDEr each epoch,
    which `select_by: val_CIDEr` needs; `val_objects` (demo boxes and
    attributes) add val object accuracy.
    """
    if params.select_by == "val_CIDEr" and not val_references:
        raise ValueError("train.select_by=val_CIDEr needs the val references (val_references)")
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        # Bit-identical reruns, at about 3x the step time under XLA on CPU.
        tf.config.experimental.enable_op_determinism()
    k = params.captions_per_image or None
    steps = steps_per_epoch(train, params.batch_size, k)
    model = compiled_captioner(store, vocabulary, params, extractor, steps)

    checkpoint_dir = Path(checkpoint_dir)
    fingerprint = settings_fingerprint(
        dataclasses.asdict(params), extractor, vocabulary.words, len(train), len(val),
        store_fingerprint(store), sorted(val_references or {}), val_objects is not None,
        code_fingerprint(),
    )  # fmt: skip
    state = _resume_state(checkpoint_dir, fingerprint)
    initial_epoch = _restore_checkpoint(model, checkpoint_dir, state, on_resume)
    checkpoint = EpochCheckpoint(
        checkpoint_dir,
        Path(history_csv),
        fingerprint,
        params.early_stopping_patience,
        state,
        monitor=params.select_by,
    )
    scorers = _epoch_scorers(store, val, params, val_references, val_objects)
    if not _finished(state, params):
        model.fit(
            caption_batches(store, train, params.batch_size, params.seed, initial_epoch, k, None),
            steps_per_epoch=steps,
            epochs=params.epochs,
            initial_epoch=initial_epoch,
            callbacks=[*scorers, checkpoint, *callbacks],
            verbose=2,
        )
    _write_history(history_csv, checkpoint.state["history"])
    model.load_weights(checkpoint_dir / "best.weights.h5")
    summary = {
        "epochs_run": checkpoint.state["epoch"],
        "best_epoch": checkpoint.state["best_epoch"],
        f"best_{params.select_by}": checkpoint.state["best"],
        "resumed_from_epoch": initial_epoch,
    }
    return model, summary


def compiled_captioner(
    store: FeatureStore,
    vocabulary: Vocabulary,
    params: TrainParams,
    extractor: dict,
    steps: int,
) -> Captioner:
    """A fresh captioner sized by `params` for `store`'s features, standardised and compiled.

    `steps`: training steps per epoch, the unit of the learning-rate schedule.
    """
    num_loc, feat_dim = store.feature_shape
    config = ModelConfig(
        vocab_size=len(vocabulary),
        embedding_dim=params.embedding_dim,
        units=params.units,
        attention_units=params.attention_units,
        encoder_dim=params.encoder_dim,
        location_embedding=params.location_embedding,
        feature_dim=feat_dim,
        num_locations=num_loc,
        attention_penalty=params.attention_penalty,
        label_smoothing=params.label_smoothing,
        **decoder_settings(params),
        **extractor,
    )
    model = build_captioner(config, vocabulary, seed=params.seed)
    mean, std = store.feature_stats("train")
    model.encoder.set_feature_stats(mean, std)
    model.compile(optimizer=make_optimizer(params, steps), jit_compile=params.jit_compile)
    return model


def _epoch_scorers(
    store: FeatureStore,
    val: CaptionSet,
    params: TrainParams,
    val_references: dict[int, list[str]] | None,
    val_objects: dict[int, list[dict]] | None,
) -> list[keras.callbacks.Callback]:
    """The callbacks that add this epoch's learning rate and val figures to the logs."""
    k = params.captions_per_image or None
    scorers: list[keras.callbacks.Callback] = [
        LearningRateLog(),
        HeldOutLoss(
            lambda: caption_arrays(store, val, params.batch_size, None, 0, k),
            params.jit_compile,
        ),
    ]
    if val_references:
        sample = val_sample(val, params.val_sample_images, params.seed)
        scorers.append(ValCaptionScore(store, sample, val_references, val_objects))
    return scorers


def save_model(model: Captioner, path: str | Path) -> None:
    """Write the `.keras` file atomically (Keras insists on the suffix)."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


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


def _restore_checkpoint(
    model: Captioner,
    directory: Path,
    state: dict | None,
    on_resume: Callable[[int], None] | None,
) -> int:
    """Load the last epoch's weights and optimiser state when resuming; the epoch to start at."""
    if not state:
        return 0
    model.load_weights(directory / "last.weights.h5")
    _load_optimizer(model, directory / "optimizer.npz")
    if on_resume:
        on_resume(state["epoch"])
    return state["epoch"]


def _finished(state: dict | None, params: TrainParams) -> bool:
    """Whether a resumed run already ran every epoch or stopped early."""
    return bool(state) and (
        state["epoch"] >= params.epochs or state["wait"] >= params.early_stopping_patience
    )


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


def _write_history(path: str | Path, rows: list[dict]) -> None:
    """Per-epoch metrics as CSV (the DVC plots source), rewritten whole each epoch."""
    fields = list(rows[0]) if rows else ["epoch"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
