"""Batches: which caption pairs make each training step, read from the feature store.

`BatchPlan` fixes the batches of every epoch from (seed, epoch), so a resumed
run sees the batches an uninterrupted one would; `caption_arrays` /
`training_batches` read them (features gathered per batch from the
memory-mapped store, so memory stays flat however large the data set is), and
`ShardedBatches` cuts each global batch into replica slices for tf.distribute.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from captioning.config import TrainParams
from captioning.data.text import PAD_ID
from captioning.features import FeatureStore


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


class ShardedBatches:
    """Training's global batch plan, each input pipeline reading only its replicas' slices.

    A global batch of `batch_size` caption pairs (or images, captions_per_image
    K) is cut into `num_replicas` equal slices in order; pipeline p of P reads
    slices p * R/P ... (p + 1) * R/P - 1, one element each. Every slice is cut to
    the global batch's width and carries the global token and row counts, which
    `replica_loss` divides by.
    """

    def __init__(
        self,
        store: FeatureStore,
        captions: CaptionSet,
        params: TrainParams,
        num_replicas: int,
    ):
        self.store = store
        self.plan = BatchPlan(captions, params.batch_size, params.captions_per_image or None)
        self.seed = params.seed
        self.num_replicas = num_replicas
        if self.plan.per_batch % num_replicas:
            unit = "images" if self.plan.k else "caption pairs"
            raise ValueError(
                f"a global batch of {self.plan.per_batch} {unit} does not split evenly "
                f"over {num_replicas} replicas: choose train.batch_size accordingly"
            )

    def dataset(self, context: tf.distribute.InputContext, start_step: int) -> tf.data.Dataset:
        """Endless batches of this input pipeline from global step `start_step` on (distribute_datasets_from_function)."""
        local = self.num_replicas // context.num_input_pipelines
        slices = range(context.input_pipeline_id * local, (context.input_pipeline_id + 1) * local)
        num_loc, feat_dim = self.store.feature_shape
        token_shape = (None, self.plan.k, None) if self.plan.k else (None, None)
        signature = (
            tf.TensorSpec((None, num_loc, feat_dim), tf.float16),
            tf.TensorSpec(token_shape, tf.int32),
            tf.TensorSpec((), tf.float32),
            tf.TensorSpec((), tf.float32),
        )

        def elements():
            for units, rows in self.plan.stream(self.seed, start_step):
                yield from self.slices(units, rows, slices)

        return tf.data.Dataset.from_generator(elements, output_signature=signature).prefetch(2)

    def slices(self, units: np.ndarray, rows: np.ndarray, which: range) -> Iterator[tuple]:
        """(features, tokens, global tokens, global rows) of slices `which` of one global batch."""
        captions = self.plan.captions
        tokens = np.asarray(captions.tokens[rows.reshape(-1)])  # (B, T): small, read whole
        # The global batch's width, rounded as BatchPlan.read rounds it, for every slice.
        width = int((tokens != PAD_ID).sum(axis=1).max())
        width = min(-(-width // 8) * 8, tokens.shape[1])
        global_tokens = np.float32((tokens[:, 1:width] != PAD_ID).sum())
        global_rows = np.float32(rows.size)
        size = len(units) // self.num_replicas
        for index in which:
            part = slice(index * size, (index + 1) * size)
            ids = self.plan.images[units[part]] if self.plan.k else captions.image_ids[rows[part]]
            part_tokens = np.asarray(captions.tokens[rows[part].reshape(-1)])[:, :width]
            yield (
                self.store.get(ids),
                part_tokens.reshape(*rows[part].shape, width),
                global_tokens,
                global_rows,
            )
