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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioning.atomic_files import atomic_path, atomic_write
from captioning.config import EvaluateParams, TrainParams
from captioning.data.demo_captions import caption_correct
from captioning.data.text import PAD_ID, Vocabulary
from captioning.evaluation import metrics
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner, ModelConfig, build_captioner, decoder_settings
from captioning.model.decode import CaptionDecoder


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
    signature = _batch_signature(store, captions_per_image)
    first_epochs = itertools.count(epoch_offset, epochs or 0)  # of each iterator, in turn

    def one_iterator():
        start = next(first_epochs)
        yield from caption_arrays(
            store, captions, batch_size, seed, start, captions_per_image, epochs
        )

    return tf.data.Dataset.from_generator(one_iterator, output_signature=signature).prefetch(2)


def training_batches(
    store: FeatureStore, plan: BatchPlan, seed: int, start_step: int = 0
) -> tf.data.Dataset:
    """The endless training stream from global step `start_step` (`BatchPlan.stream`), prefetched."""

    def batches():
        for units, rows in plan.stream(seed, start_step):
            yield plan.read(store, units, rows)

    signature = _batch_signature(store, plan.k)
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)


def _batch_signature(store: FeatureStore, captions_per_image: int | None) -> tuple:
    num_loc, feat_dim = store.feature_shape
    token_shape = (None, captions_per_image, None) if captions_per_image else (None, None)
    return (
        tf.TensorSpec((None, num_loc, feat_dim), tf.float16),
        tf.TensorSpec(token_shape, tf.int32),
    )


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
            self.images, self.first_row, self.image_of_row, self.counts = np.unique(
                captions.image_ids, return_index=True, return_inverse=True, return_counts=True
            )
            order = np.argsort(captions.image_ids, kind="stable")
            self.rows_by_image = np.split(order, np.cumsum(self.counts)[:-1])
            self.block_start = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            self.per_batch = max(1, round(batch_size / self.k))
        else:
            self.per_batch = batch_size
        self._cycles: dict[tuple[int, int], np.ndarray] = {}

    @property
    def units(self) -> int:
        return len(self.images) if self.k else len(self.captions)

    @property
    def steps_per_pass(self) -> int:
        """Batches in one shuffled pass (full batches only, or one short batch of everything)."""
        return max(1, self.units // self.per_batch)

    @property
    def pairs_per_step(self) -> int:
        """Caption pairs in one training batch."""
        return min(self.per_batch, self.units) * (self.k or 1)

    def epoch(self, seed: int | None, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(units, rows) of every batch of pass `epoch`: shuffled by (seed, epoch), or in order.

        With K captions per image, pass p gives each image its captions number
        pK .. pK+K-1 of a cycle through all of them (a new order each cycle),
        so over the passes every caption is used equally often.
        """
        if seed is None:
            return [(units, self._rows(units)) for units in self._in_order()]
        return self._shuffled(np.random.default_rng([seed, epoch]), seed, epoch)

    def stream(self, seed: int, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(units, rows) of every training batch from global step `start_step` on, endlessly.

        Step s is batch s % steps_per_pass of pass s // steps_per_pass, so a run
        resumed at any step sees the batches an uninterrupted one would.
        """
        first, skip = divmod(start_step, self.steps_per_pass)
        for number in itertools.count(first):
            yield from self.epoch(seed, number)[skip:]
            skip = 0

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

    def _shuffled(
        self, rng: np.random.Generator, seed: int, number: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        order = np.arange(self.units)
        rng.shuffle(order)
        if not self.k:
            batches = _length_buckets(order, self.lengths, self.per_batch, rng)
            return [(units, self._rows(units)) for units in batches]
        # Take this pass's K captions per image first, then group images by the
        # length of those captions: a batch is cut to its longest row.
        picked = self._cycled(seed, number)  # (units, K), indexed by image
        batches = _length_buckets(order, self.lengths[picked].max(axis=1), self.per_batch, rng)
        return [(units, picked[units]) for units in batches]

    def _cycled(self, seed: int, number: int) -> np.ndarray:
        """(images, K) caption rows of pass `number`: positions number*K + j of each image's cycle."""
        picked = np.empty((self.units, self.k), dtype=np.int64)
        for j in range(self.k):
            position = number * self.k + j
            cycle, rank = np.divmod(position, self.counts)  # per image: which cycle, which caption
            for c in np.unique(cycle):
                images = np.flatnonzero(cycle == c)
                order = self._cycle_order(seed, int(c))
                picked[images, j] = order[self.block_start[images] + rank[images]]
        return picked

    def _cycle_order(self, seed: int, cycle: int) -> np.ndarray:
        """All caption rows grouped by image (image order), in cycle `cycle`'s order within each."""
        key = (seed, cycle)
        if key not in self._cycles:
            if len(self._cycles) > 4:
                self._cycles.clear()
            shuffle = np.random.default_rng([seed, cycle, 1]).random(len(self.captions))
            self._cycles[key] = np.lexsort((shuffle, self.image_of_row))
        return self._cycles[key]

    def _rows(self, units: np.ndarray) -> np.ndarray:
        """Caption rows of `units` in store order: (B,) sorted captions, or (n, K) per image.

        Per image (validation): its first K captions, repeated when it has fewer.
        """
        if not self.k:
            return np.sort(units)  # sorted: friendlier to the mmap
        return np.stack([np.resize(self.rows_by_image[unit], self.k) for unit in units])


def steps_per_epoch(captions: CaptionSet, batch_size: int, captions_per_image: int | None) -> int:
    """Training batches `caption_batches` makes per pass over the data (full batches only)."""
    return BatchPlan(captions, batch_size, captions_per_image).steps_per_pass


@dataclasses.dataclass(frozen=True)
class TrainingBudget:
    """How a budget in caption pairs becomes steps and epochs for one data set.

    An epoch is `steps_per_epoch` steps of `pairs_per_step` pairs (about
    `train.epoch_pairs`, whatever the data size); `epochs` of them cover
    `train.budget_pairs`, rounded up to whole epochs. The schedule spans
    `total_steps`.
    """

    pairs_per_step: int
    steps_per_epoch: int
    epochs: int
    steps_per_pass: int  # batches in one pass over the data set

    @classmethod
    def of(cls, params: TrainParams, train: CaptionSet) -> TrainingBudget:
        plan = BatchPlan(train, params.batch_size, params.captions_per_image or None)
        per_step = plan.pairs_per_step
        steps = max(1, round(params.epoch_pairs / per_step))
        epochs = max(1, -(-params.budget_pairs // (steps * per_step)))
        return cls(per_step, steps, epochs, plan.steps_per_pass)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def pairs_seen(self, epochs: int) -> int:
        """Caption pairs trained on after `epochs` epochs."""
        return epochs * self.steps_per_epoch * self.pairs_per_step

    def passes(self, epochs: int) -> float:
        """Passes over the data set after `epochs` epochs."""
        return epochs * self.steps_per_epoch / self.steps_per_pass


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
    from captioning import config
    from captioning.evaluation import metrics
    from captioning.model import captioner as model
    from captioning.model import decode, transformer

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


@dataclasses.dataclass(frozen=True)
class StoppingRule:
    """When a run stops early, and when it ends still improving (`train.*` of those names).

    Both read the selection metric averaged over the last `smoothing_epochs`
    epochs. The average improves when it beats its best so far by more than
    `min_delta`; the run stops after `patience_pairs` caption pairs without
    an improvement, but not before `start_pairs`. A run that ends on an
    improvement was still improving. No field has a default: `StoppingRule.of`
    takes them from `TrainParams`, their one home.
    """

    monitor: str
    smoothing_epochs: int
    min_delta: float
    patience_pairs: int  # 0: never stop early
    start_pairs: int

    @classmethod
    def of(cls, params: TrainParams) -> StoppingRule:
        return cls(
            params.select_by,
            params.smoothing_epochs,
            params.min_delta,
            params.early_stopping_pairs,
            round(params.early_stopping_from * params.budget_pairs),
        )

    def stops(self, values: Sequence[float], pairs_per_epoch: int) -> bool:
        """Whether a run whose epochs of `pairs_per_epoch` pairs gave `values` stops now."""
        seen = len(values) * pairs_per_epoch
        waited = (len(values) - self.best_smoothed_epoch(values)) * pairs_per_epoch
        return (
            bool(self.patience_pairs) and waited >= self.patience_pairs and seen >= self.start_pairs
        )

    @property
    def sign(self) -> float:
        """Losses are minimised, anything else (val_CIDEr) maximised: minimise sign * value."""
        return 1.0 if self.monitor.endswith("loss") else -1.0

    @property
    def smoothed_name(self) -> str:
        return f"{self.monitor}_smoothed"

    def smoothed(self, values: Sequence[float]) -> float:
        return float(np.mean(values[-self.smoothing_epochs :]))

    def improves(self, value: float, best: float | None, delta: float = 0.0) -> bool:
        return best is None or self.sign * (best - value) > delta

    def best_smoothed_epoch(self, values: Sequence[float]) -> int:
        """The epoch (1-based) of the last improvement of the average over `values`."""
        best, epoch = None, 0
        for index in range(len(values)):
            smoothed = self.smoothed(values[: index + 1])
            if self.improves(smoothed, best, self.min_delta):
                best, epoch = smoothed, index + 1
        return epoch

    def still_improving(self, values: Sequence[float]) -> bool:
        """Whether the last epoch improved the average: the run ended while still learning."""
        return len(values) > 1 and self.best_smoothed_epoch(values) == len(values)


def still_improving_warning(rule: StoppingRule, history: Sequence[dict]) -> str | None:
    """The warning a run gets when it ended still improving (None when it converged or stopped)."""
    values = [float(row[rule.monitor]) for row in history if rule.monitor in row]
    if not rule.still_improving(values):
        return None
    last = history[-1]
    return (
        f"still improving: {rule.monitor} averaged over the last {rule.smoothing_epochs} "
        f"epochs was best at the last epoch ({last['epoch']}, {int(last['pairs_seen'])} caption "
        f"pairs; {rule.smoothed(values):.4g} > every earlier average by more than "
        f"{rule.min_delta:g}). The model had not converged: raise train.budget_pairs."
    )


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
        history_csv: Path,
        fingerprint: str,
        rule: StoppingRule,
        budget: TrainingBudget,
        state: dict | None = None,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.history_csv = Path(history_csv)
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
        write_history(self.history_csv, self.state["history"])
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


def make_optimizer(params: TrainParams, total_steps: int) -> keras.optimizers.Optimizer:
    """Adam with the scheduled learning rate and global-norm gradient clipping of `params`.

    `total_steps`: the steps of the whole budget (`TrainingBudget.total_steps`),
    which the cosine schedule spans.
    """
    rate: float | keras.optimizers.schedules.LearningRateSchedule = params.learning_rate
    if params.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            params.learning_rate, decay_steps=max(1, total_steps), alpha=params.lr_min_fraction
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
    budget = TrainingBudget.of(params, train)
    model = compiled_captioner(store, vocabulary, params, extractor, budget.total_steps)

    checkpoint_dir = Path(checkpoint_dir)
    fingerprint = run_fingerprint(
        params, extractor, vocabulary, train, val, store, val_references, val_objects
    )
    state = resume_state(checkpoint_dir, fingerprint)
    initial_epoch = _restore_checkpoint(model, checkpoint_dir, state, on_resume)
    checkpoint = EpochCheckpoint(
        checkpoint_dir, Path(history_csv), fingerprint, StoppingRule.of(params), budget, state
    )
    scorers = epoch_scorers(store, val, params, val_references, val_objects)
    if not finished(checkpoint.state, budget):
        plan = BatchPlan(train, params.batch_size, params.captions_per_image or None)
        model.fit(
            training_batches(store, plan, params.seed, initial_epoch * budget.steps_per_epoch),
            steps_per_epoch=budget.steps_per_epoch,
            epochs=budget.epochs,
            initial_epoch=initial_epoch,
            callbacks=[*scorers, checkpoint, *callbacks],
            verbose=2,
        )
    write_history(history_csv, checkpoint.state["history"])
    model.load_weights(checkpoint_dir / "best.weights.h5")
    return model, checkpoint.summary(initial_epoch)


def run_fingerprint(
    params: TrainParams,
    extractor: dict,
    vocabulary: Vocabulary,
    train: CaptionSet,
    val: CaptionSet,
    store: FeatureStore,
    val_references: dict | None,
    val_objects: dict | None,
) -> str:
    """What a checkpoint must match to be resumed: settings, data, code (not the strategy)."""
    return settings_fingerprint(
        # N workers resume on M, and one process on either.
        dataclasses.asdict(dataclasses.replace(params, distribute="none")), extractor,
        vocabulary.words, len(train), len(val), store_fingerprint(store),
        sorted(val_references or {}), val_objects is not None, code_fingerprint(),
    )  # fmt: skip


def compiled_captioner(
    store: FeatureStore,
    vocabulary: Vocabulary,
    params: TrainParams,
    extractor: dict,
    total_steps: int,
) -> Captioner:
    """A fresh captioner sized by `params` for `store`'s features, standardised and compiled.

    `total_steps`: the steps the learning-rate schedule spans (the whole budget).
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
    model.compile(optimizer=make_optimizer(params, total_steps), jit_compile=params.jit_compile)
    return model


def epoch_scorers(
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
