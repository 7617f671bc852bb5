"""Training under tf.distribute: a host's devices (`mirrored`) or a TF_CONFIG cluster (`multi_worker`).

Keras 3 `fit` fails under MultiWorkerMirroredStrategy with two or more workers
(`python -m benchmarks.multi_worker_fit` reproduces it), so this module runs
a short loop of its own. Each replica computes the gradients of its slice of
the global batch in a compiled function (XLA where `jit_compile` is on: the
collectives stay outside it, XLA does not compile them); the gradients are
summed across replicas, then clipped and applied once, by an optimiser told
not to sum them again. A replica's loss is its share of the single-device
loss (`captioning.model.captioner.masked_loss`): token sums over the global batch's
token count, the attention penalty over the global batch's rows, so the
summed gradients, the clipping and the update are one device's on the same
global batch, whatever the replica count. Every input pipeline builds the same
global batch plan (training's `BatchPlan` stream, by global step) and reads
only its replicas' slices of each batch, so each caption pair is seen once per
pass over the data, as on one device.
Only the chief validates, checkpoints, and writes the model, the history and
what the callbacks record; it broadcasts its checkpoint at the start and its
early-stopping decision after each epoch, so a checkpoint written with N
workers resumes with M. As with `fit`, checkpoints are per epoch: a run
killed mid-epoch repeats that epoch, on the same batches. `train.precision` other than float32 also runs here,
on one device too: the model trains under Keras' mixed policy (float16 with
loss scaling), while validation, checkpoints and the written model use a
float32 copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioning.config import TrainParams
from captioning.data.text import PAD_ID, Vocabulary
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner, masked_loss
from captioning.training.loop import (
    BatchPlan,
    CaptionSet,
    EpochCheckpoint,
    LearningRateLog,
    StoppingRule,
    TrainingBudget,
    compiled_captioner,
    epoch_scorers,
    finished,
    fit_captioner,
    make_optimizer,
    resume_state,
    run_fingerprint,
    write_history,
)

# The train logs, named and ordered as Keras' `fit` logs them: the history CSVs match.
FIGURES = ("attention_penalty", "ce", "loss", "token_accuracy")


def make_strategy(distribute: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy `train.distribute` names (`none`: the default, one device)."""
    if distribute == "mirrored":
        return tf.distribute.MirroredStrategy()
    if distribute == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if distribute == "none":
        return tf.distribute.get_strategy()
    raise ValueError(f"train.distribute={distribute!r}: use none, mirrored or multi_worker")


def is_chief(distribute: str, tf_config: str | None = None) -> bool:
    """Whether this process writes outputs: task `chief`, or worker 0 of a cluster without one.

    `tf_config` defaults to the TF_CONFIG environment variable; outside
    `multi_worker` every process is its own chief.
    """
    if distribute != "multi_worker":
        return True
    raw = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not raw:
        return True
    config = json.loads(raw)
    task = config.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if "chief" in config.get("cluster", {}):
        return kind == "chief"
    return kind == "worker" and index == 0


def trainer(params: TrainParams) -> Callable[..., tuple[Captioner, dict]]:
    """The training function for `params`: Keras `fit` on one device in float32, else this loop."""
    if params.distribute == "none" and params.precision == "float32":
        return fit_captioner
    return train_distributed


def replica_loss(targets, logits, weights, global_tokens, global_rows, attention_penalty, label_smoothing):  # fmt: skip
    """This replica's share of `masked_loss` over the global batch; the shares sum to it.

    targets (b, T) int, logits (b, T, V), weights (b, T, L) of this replica's
    rows; global_tokens: non-pad targets in the global batch; global_rows: its
    captions. Returns the shares of (loss, ce, penalty, token accuracy).
    """
    logits, weights = tf.cast(logits, tf.float32), tf.cast(weights, tf.float32)  # mixed precision
    loss, ce, penalty = masked_loss(
        targets, logits, weights, attention_penalty, label_smoothing, global_tokens, global_rows
    )
    mask = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)  # (b, T)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=targets.dtype), targets), tf.float32)
    accuracy = tf.reduce_sum(hits * mask) / tf.maximum(global_tokens, 1.0)
    return loss, ce, penalty, accuracy


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


@keras.saving.register_keras_serializable(package="captioning")
class SummedGradientsAdam(keras.optimizers.Adam):
    """Adam for gradients the training loop has already summed across replicas.

    Keras' TensorFlow optimiser clips each replica's gradients and then sums
    them; the loop sums first, so clipping sees the global gradient, and this
    optimiser must not sum them again.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def distributed_optimizer(params: TrainParams, total_steps: int) -> keras.optimizers.Optimizer:
    """`make_optimizer`'s Adam (schedule over `total_steps`, clipping), loss-scaled for float16."""
    adam = SummedGradientsAdam.from_config(make_optimizer(params, total_steps).get_config())
    if params.precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(adam)
    return adam


def distributed_step(
    strategy: tf.distribute.Strategy,
    model: Captioner,
    optimizer: keras.optimizers.Optimizer,
    jit_compile: bool,
) -> Callable:
    """One training step over every replica: iterator -> summed FIGURES (4,)."""
    config = model.model_config

    def gradients(features, tokens, global_tokens, global_rows):
        with tf.GradientTape() as tape:
            inputs, targets = tokens[..., :-1], tokens[..., 1:]  # teacher forcing shift
            logits, weights = model((features, inputs), training=True)
            targets = tf.reshape(targets, [-1, tf.shape(targets)[-1]])  # (b, T-1)
            loss, ce, penalty, accuracy = replica_loss(
                targets, logits, weights, global_tokens, global_rows,
                config.attention_penalty, config.label_smoothing,
            )  # fmt: skip
            scaled = optimizer.scale_loss(loss)  # float16: loss scaling
        grads = tape.gradient(scaled, model.trainable_variables)
        # Dense: the embedding's sparse gradient would leave the compiled function as slices.
        grads = [tf.convert_to_tensor(g) for g in grads]
        return grads, tf.stack([penalty, ce, loss, accuracy])  # FIGURES' order

    compiled = tf.function(gradients, jit_compile=jit_compile)

    def replica_step(batch):
        grads, figures = compiled(*batch)
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        optimizer.apply(grads, model.trainable_variables)
        return figures

    @tf.function
    def step(iterator):
        figures = strategy.run(replica_step, args=(next(iterator),))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, figures, axis=None)

    return step


def broadcast_from_chief(strategy: tf.distribute.Strategy, arrays: list[np.ndarray]) -> list:
    """The chief's `arrays` on every worker (the others pass arrays of the same shapes).

    A sum over replicas in which every replica but the chief's first adds zeros:
    exact, and built from the one collective every strategy has.
    """
    tensors = [tf.constant(np.asarray(a, dtype=np.float64)) for a in arrays]

    @tf.function
    def exchange():
        def keep_first(values):
            context = tf.distribute.get_replica_context()
            first = tf.cast(tf.equal(context.replica_id_in_sync_group, 0), tf.float64)
            return context.all_reduce(tf.distribute.ReduceOp.SUM, [v * first for v in values])

        return strategy.run(keep_first, args=(tensors,))

    local = strategy.experimental_local_results(exchange())[0]
    return [np.asarray(v) for v in local]


class _ChiefView:
    """What EpochCheckpoint saves: the float32 copy's weights and the training optimiser."""

    def __init__(self, weights_model: keras.Model, optimizer: keras.optimizers.Optimizer):
        self.weights_model = weights_model
        self.optimizer = optimizer
        self.stop_training = False

    def save_weights(self, path):
        self.weights_model.save_weights(path)


@dataclasses.dataclass
class _Run:
    """The pieces of one distributed training run, as `train_distributed` sets them up."""

    strategy: tf.distribute.Strategy
    chief: bool
    model: Captioner  # trained, its variables mirrored over the replicas
    reference: Captioner  # float32 copy outside the strategy: validation, checkpoints, output
    optimizer: keras.optimizers.Optimizer
    budget: TrainingBudget


def train_distributed(
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
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[Captioner, dict]:
    """`fit_captioner` under `params.distribute` and `params.precision`; same files, same summary.

    The chief returns the best model by `params.select_by` and writes
    `checkpoint_dir` and `history_csv`; the callbacks (MLflow) run on the chief
    only. Other workers write nothing and return their last weights with a
    summary. `strategy` defaults to the one `params.distribute` names.
    """
    if params.select_by == "val_CIDEr" and not val_references:
        raise ValueError("train.select_by=val_CIDEr needs the val references (val_references)")
    run = _build(store, vocabulary, train, params, extractor, strategy)
    fingerprint = run_fingerprint(
        params, extractor, vocabulary, train, val, store, val_references, val_objects
    )
    checkpoint = EpochCheckpoint(
        Path(checkpoint_dir),
        Path(history_csv),
        fingerprint,
        StoppingRule.of(params),
        run.budget,
        resume_state(Path(checkpoint_dir), fingerprint) if run.chief else None,
    )
    initial_epoch, done = _restore_on_every_worker(run, checkpoint, on_resume)
    chief_callbacks = []
    if run.chief:
        scorers = epoch_scorers(store, val, params, val_references, val_objects)
        chief_callbacks = _chief_callbacks(run, scorers, checkpoint, callbacks)
    last_epoch = initial_epoch
    if not done:
        batches = ShardedBatches(store, train, params, run.strategy.num_replicas_in_sync)
        data = run.strategy.distribute_datasets_from_function(
            lambda context: batches.dataset(context, initial_epoch * run.budget.steps_per_epoch)
        )
        last_epoch = _epochs(run, iter(data), params, initial_epoch, chief_callbacks, checkpoint)
    result = _finish(run, checkpoint, history_csv, initial_epoch, last_epoch)
    # Leave together: a worker that exits while the chief still writes is reported
    # by the chief's coordination service as a crashed task.
    broadcast_from_chief(run.strategy, [0.0])
    return result


def _build(
    store: FeatureStore,
    vocabulary: Vocabulary,
    train: CaptionSet,
    params: TrainParams,
    extractor: dict,
    strategy: tf.distribute.Strategy | None,
) -> _Run:
    """The strategy, then the seeded models (the trained one under `params.precision`)."""
    strategy = strategy or make_strategy(params.distribute)  # before any other TF op
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    budget = TrainingBudget.of(params, train)
    steps = budget.total_steps
    reference = compiled_captioner(store, vocabulary, params, extractor, steps)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(params.precision)
    try:
        with strategy.scope():
            model = compiled_captioner(store, vocabulary, params, extractor, steps)
            optimizer = distributed_optimizer(params, steps)
            optimizer.build(model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    run = _Run(strategy, is_chief(params.distribute), model, reference, optimizer, budget)
    role = "chief" if run.chief else "worker"
    print(
        f"train: {params.distribute} on {strategy.num_replicas_in_sync} replicas, "
        f"{role}, {params.precision}",
        flush=True,
    )
    return run


def _chief_callbacks(
    run: _Run,
    scorers: list[keras.callbacks.Callback],
    checkpoint: EpochCheckpoint,
    callbacks: list[keras.callbacks.Callback],
) -> list[keras.callbacks.Callback]:
    """fit's callbacks in fit's order, reading the float32 copy; the checkpoint saves the optimiser."""
    checkpoint.set_model(_ChiefView(run.reference, run.optimizer))
    # The loop logs the learning rate itself: the copy's optimiser never steps.
    scorers = [c for c in scorers if not isinstance(c, LearningRateLog)]
    for callback in [*scorers, *callbacks]:
        callback.set_model(run.reference)
    return [*scorers, checkpoint, *callbacks]


def _restore_on_every_worker(run: _Run, checkpoint: EpochCheckpoint, on_resume) -> tuple[int, bool]:
    """Load the chief's checkpoint (if any) into every replica; (epoch to start at, finished)."""
    variables = run.model.weights
    slots = run.optimizer.variables
    state = checkpoint.state if run.chief else None
    values = [v.numpy() for v in variables] + [v.numpy() for v in slots]
    position = [0.0, 0.0]
    if run.chief and state["epoch"]:
        directory = checkpoint.directory
        run.reference.load_weights(directory / "last.weights.h5")
        with np.load(directory / "optimizer.npz") as saved:
            saved_slots = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if len(saved_slots) != len(slots):
            raise ValueError(f"{directory}: optimiser state does not match the model")
        values = [v.numpy() for v in run.reference.weights] + saved_slots
        position = [float(state["epoch"]), float(finished(state, run.budget))]
        if on_resume:
            on_resume(state["epoch"])
    *values, epoch, done = broadcast_from_chief(run.strategy, [*values, *position])
    for variable, value in zip([*variables, *slots], values, strict=True):
        variable.assign(value.astype(variable.dtype))
    return int(epoch), bool(done)


def _epochs(
    run: _Run,
    iterator,
    params: TrainParams,
    initial_epoch: int,
    callbacks: list[keras.callbacks.Callback],
    checkpoint: EpochCheckpoint,
) -> int:
    """Train from `initial_epoch`; the chief validates, checkpoints and decides when to stop.

    `callbacks`: the chief's (none on the other workers). Returns the epochs completed.
    """
    step = distributed_step(run.strategy, run.model, run.optimizer, params.jit_compile)
    epoch = initial_epoch
    epochs, steps = run.budget.epochs, run.budget.steps_per_epoch
    for epoch in range(initial_epoch, epochs):
        totals = np.zeros(len(FIGURES))
        for index in range(steps):
            totals += step(iterator).numpy()
            for callback in callbacks:
                callback.on_train_batch_end(index)
        logs = dict(zip(FIGURES, (totals / steps).tolist(), strict=True))
        stop = 0.0
        if run.chief:
            run.reference.set_weights(run.model.get_weights())
            logs["learning_rate"] = float(run.optimizer.learning_rate)
            for callback in callbacks:
                callback.on_epoch_end(epoch, logs)
            stop = float(checkpoint.model.stop_training)
            print(f"epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{name} {value:.4f}" for name, value in logs.items()
            ), flush=True)  # fmt: skip
        if broadcast_from_chief(run.strategy, [stop])[0]:
            break
    return epoch + 1


def _finish(
    run: _Run,
    checkpoint: EpochCheckpoint,
    history_csv: str | Path,
    initial_epoch: int,
    last_epoch: int,
) -> tuple[Captioner, dict]:
    """The chief's best model and the run's summary (a worker's: its last weights)."""
    if run.chief:
        write_history(history_csv, checkpoint.state["history"])
        run.reference.load_weights(checkpoint.directory / "best.weights.h5")
    else:
        run.reference.set_weights(run.model.get_weights())
    summary = checkpoint.summary(initial_epoch)
    if not run.chief:
        summary.update(epochs_run=last_epoch, pairs_seen=run.budget.pairs_seen(last_epoch))
    return run.reference, summary
