"""What both training engines share: the model, the optimiser, the set-up, the choice.

`fit_captioner` (`training.fit`: Keras `fit`, one device, float32) and
`train_distributed` (`training.distributed`: its own epoch loop under
tf.distribute or mixed precision) take the same arguments, build the same
model and optimiser here, take one gradient step with the same function
(`Captioner.gradients`), share batches, budget, checkpoints, stopping and
validation callbacks, and write the same files. `trainer` picks one.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from captioning.config import TrainParams
from captioning.data.text import Vocabulary
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner, ModelConfig, build_captioner, decoder_settings
from captioning.training.batches import CaptionSet
from captioning.training.budget import StoppingRule, TrainingBudget
from captioning.training.checkpoints import EpochCheckpoint, resume_state


@keras.saving.register_keras_serializable(package="captioning")
class SummedGradientsAdam(keras.optimizers.Adam):
    """Adam for gradients the training loop has already summed across replicas.

    Keras' TensorFlow optimiser clips each replica's gradients and then sums
    them; the distributed loop sums first, so clipping sees the global
    gradient, and this optimiser must not sum them again.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def make_optimizer(
    params: TrainParams, total_steps: int, summed: bool = False
) -> keras.optimizers.Optimizer:
    """Adam with the scheduled learning rate and global-norm gradient clipping of `params`.

    `total_steps`: the steps of the whole budget (`TrainingBudget.total_steps`),
    which the cosine schedule spans. `summed`: for gradients already summed
    across replicas (the distributed loop), loss-scaled under mixed_float16.
    """
    rate: float | keras.optimizers.schedules.LearningRateSchedule = params.learning_rate
    if params.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            params.learning_rate, decay_steps=max(1, total_steps), alpha=params.lr_min_fraction
        )
    adam = (SummedGradientsAdam if summed else keras.optimizers.Adam)(
        rate, global_clipnorm=params.clip_norm or None
    )
    if summed and params.precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(adam)
    return adam


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


def start(params: TrainParams, train: CaptionSet, val_references: dict | None) -> TrainingBudget:
    """Check the selection metric can be computed, seed every generator; the run's budget."""
    if params.select_by == "val_CIDEr" and not val_references:
        raise ValueError("train.select_by=val_CIDEr needs the val references (val_references)")
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        # Bit-identical reruns, at about 3x the step time under XLA on CPU.
        tf.config.experimental.enable_op_determinism()
    return TrainingBudget.of(params, train)


def open_checkpoint(
    directory: str | Path,
    fingerprint: str,
    params: TrainParams,
    budget: TrainingBudget,
    resume: bool = True,
) -> EpochCheckpoint:
    """The run's checkpoint callback, holding the state it resumes from (when `resume`)."""
    state = resume_state(Path(directory), fingerprint) if resume else None
    rule = StoppingRule.of(params)
    return EpochCheckpoint(Path(directory), fingerprint, rule, budget, state)


def resume_callbacks(
    callbacks: list[keras.callbacks.Callback], checkpoint: EpochCheckpoint
) -> None:
    """Hand the epochs already run to each callback that keeps its own record (a `resume` method).

    DVCLive's files are a DVC output, deleted before the stage runs again:
    `LiveMetrics.resume` writes them back. Called on a fresh run too (no rows).
    """
    for callback in callbacks:
        if hasattr(callback, "resume"):
            callback.resume(checkpoint.state["history"])
