"""Training under tf.distribute: a host's devices (`mirrored`) or a TF_CONFIG cluster (`multi_worker`).

Keras 3 `fit` fails under MultiWorkerMirroredStrategy with two or more workers
(`python -m benchmarks multi_worker_fit` reproduces it), so this module runs
the epoch loop itself; everything else is `training.fit`'s: the model and the
optimiser (`training.engine`), the step's gradients (`Captioner.gradients`),
the batch plan, the budget, the checkpoint and the validation callbacks. Each
replica computes the gradients of its slice of the global batch in a compiled
function (XLA where `jit_compile` is on: the collectives stay outside it, XLA
does not compile them); the gradients are summed across replicas, then
clipped and applied once, by an optimiser told not to sum them again. A
replica's loss is its share of the single-device loss (`masked_loss` over the
global batch's token count and rows), so the summed gradients, the clipping
and the update are one device's on the same global batch, whatever the
replica count. Every input pipeline builds the same global batch plan and
reads only its replicas' slices of each batch (`ShardedBatches`), so each
caption pair is seen once per pass over the data, as on one device.
Only the chief validates, checkpoints, and writes the model, the history and
what the callbacks record; it broadcasts its checkpoint at the start and its
early-stopping decision after each epoch, so a checkpoint written with N
workers resumes with M. As with `fit`, checkpoints are per epoch: a run
killed mid-epoch repeats that epoch, on the same batches. `train.precision`
other than float32 also runs here, on one device too: the model trains under
Keras' mixed policy (float16 with loss scaling), while validation,
checkpoints and the written model use a float32 copy."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioning.config import TrainParams
from captioning.data.scorers import SourceScorer
from captioning.data.text import Vocabulary
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner
from captioning.training import engine
from captioning.training.batches import CaptionSet, ShardedBatches
from captioning.training.budget import TrainingBudget
from captioning.training.callbacks import LearningRateLog, epoch_scorers
from captioning.training.checkpoints import (
    EpochCheckpoint,
    finished,
    run_fingerprint,
    write_history,
)
from captioning.training.fit import fit_captioner

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


def distributed_step(
    strategy: tf.distribute.Strategy,
    model: Captioner,
    optimizer: keras.optimizers.Optimizer,
    jit_compile: bool,
) -> Callable:
    """One training step over every replica: iterator -> summed FIGURES (4,)."""

    def gradients(features, tokens, global_tokens, global_rows):
        grads, figures = model.gradients((features, tokens), optimizer, global_tokens, global_rows)
        # Dense: the embedding's sparse gradient would leave the compiled function as slices.
        grads = [tf.convert_to_tensor(g) for g in grads]
        loss, ce, penalty, accuracy = figures
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
    val_scorer: SourceScorer | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[Captioner, dict]:
    """`fit_captioner` under `params.distribute` and `params.precision`; same files, same summary.

    The chief returns the best model by `params.select_by` and writes
    `checkpoint_dir` and `history_csv`; the callbacks (MLflow) run on the chief
    only. Other workers write nothing and return their last weights with a
    summary. `strategy` defaults to the one `params.distribute` names.
    """
    run = _build(store, vocabulary, train, params, extractor, strategy, val_references)
    fingerprint = run_fingerprint(
        params, extractor, vocabulary, train, val, store, val_references, val_scorer
    )
    checkpoint = engine.open_checkpoint(
        checkpoint_dir, fingerprint, params, run.budget, resume=run.chief
    )
    initial_epoch, done = _restore_on_every_worker(run, checkpoint, on_resume)
    chief_callbacks = []
    if run.chief:
        engine.resume_callbacks(callbacks, checkpoint)
        scorers = epoch_scorers(store, val, params, val_references, val_scorer)
        chief_callbacks = _chief_callbacks(run, scorers, checkpoint, callbacks)
    last_epoch = initial_epoch
    if not done:
        batches = ShardedBatches(store, train, params, run.strategy.num_replicas_in_sync)
        data = run.strategy.distribute_datasets_from_function(
            lambda context: batches.dataset(context, initial_epoch * run.budget.steps_per_epoch)
        )
        for callback in chief_callbacks:
            callback.on_train_begin()
        last_epoch = _epochs(run, iter(data), params, initial_epoch, chief_callbacks, checkpoint)
        for callback in chief_callbacks:
            callback.on_train_end()  # as fit does: DVCLive ends its run here
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
    val_references: dict | None,
) -> _Run:
    """The strategy, then the seeded models (the trained one under `params.precision`)."""
    strategy = strategy or make_strategy(params.distribute)  # before any other TF op
    budget = engine.start(params, train, val_references)
    steps = budget.total_steps
    reference = engine.compiled_captioner(store, vocabulary, params, extractor, steps)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(params.precision)
    try:
        with strategy.scope():
            model = engine.compiled_captioner(store, vocabulary, params, extractor, steps)
            optimizer = engine.make_optimizer(params, steps, summed=True)
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
