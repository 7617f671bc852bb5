"""Training on one device with Keras `fit`: the default engine (`train.distribute: none`).

Each epoch the caption pairs are shuffled with a seed derived from (seed,
epoch), which keeps a resumed run on the same batches as an uninterrupted one.
After every epoch the weights, the optimiser state and the early-stopping
state are checkpointed; `fit_captioner` picks up from the last completed epoch
when the checkpoint was made with the same settings, and ends with the best
weights by the selection metric: val CIDEr of greedy captions for a fixed val
sample (the default), or val loss. Val loss mostly measures how well the model
guesses the wording of one of five references; CIDEr measures the caption it
actually writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras

from captioning.config import TrainParams
from captioning.data.scorers import SourceScorer
from captioning.data.text import Vocabulary
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner
from captioning.training import engine
from captioning.training.batches import BatchPlan, CaptionSet, training_batches
from captioning.training.callbacks import epoch_scorers
from captioning.training.checkpoints import (
    finished,
    restore_checkpoint,
    run_fingerprint,
    write_history,
)


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
    val_scorer: SourceScorer | None = None,
) -> tuple[Captioner, dict]:
    """Train (or resume) and return the best model by `params.select_by` and a summary.

    `extractor`: the ModelConfig fields naming the feature extractor
    (image_size, extractor_weights, extractor_seed, extractor_digest).
    `val_references` (raw captions by image id) enable val CIDEr each epoch,
    which `select_by: val_CIDEr` needs; `val_scorer` (the data source's own
    scores, `captioning.data.sources.source_scorer`) adds its caption scores
    (the demo's val object accuracy).
    """
    budget = engine.start(params, train, val_references)
    model = engine.compiled_captioner(store, vocabulary, params, extractor, budget.total_steps)
    fingerprint = run_fingerprint(
        params, extractor, vocabulary, train, val, store, val_references, val_scorer
    )
    checkpoint = engine.open_checkpoint(checkpoint_dir, fingerprint, params, budget)
    initial_epoch = restore_checkpoint(model, checkpoint.directory, checkpoint.state, on_resume)
    engine.resume_callbacks(callbacks, checkpoint)
    scorers = epoch_scorers(store, val, params, val_references, val_scorer)
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
    model.load_weights(checkpoint.directory / "best.weights.h5")
    return model, checkpoint.summary(initial_epoch)
