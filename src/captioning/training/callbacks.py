"""The epoch's validation figures, added to the logs the checkpoint and MLflow read, and DVCLive.

`HeldOutLoss` (val loss and its parts), `ValCaptionScore` (val CIDEr of greedy
captions for a fixed val sample, plus the data source's own caption scores
when it has any) and `LearningRateLog`; `epoch_scorers` assembles them in
the order both training engines run them. `LiveMetrics` is DVCLive's Keras
callback, run after the checkpoint: each epoch's logs become DVCLive's
metrics (`dvc exp show`, `dvc plots`, VS Code and Studio live plots).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from captioning.config import EvaluateParams, TrainParams
from captioning.data.scorers import SourceScorer
from captioning.evaluation import metrics
from captioning.features import FeatureStore
from captioning.model.decode import CaptionDecoder
from captioning.training.batches import CaptionSet, caption_arrays


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

    With a `scorer` (the data source's own scores) it also adds each of its
    caption scores as `val_<name>`: on the demo, `val_object_accuracy`, the
    share of those captions that name every object right. Runs before the
    checkpoint callback, which can then select on it, and before the MLflow
    logger, which records it.
    """

    def __init__(
        self,
        store: FeatureStore,
        image_ids: np.ndarray,
        references: dict[int, list[str]],
        scorer: SourceScorer | None = None,
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
        self.scorer = scorer
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
        if self.scorer is not None:
            _, scores = self.scorer.caption_scores(list(candidates), list(candidates.values()))
            logs.update({f"val_{name}": value for name, value in scores.items()})


class LearningRateLog(keras.callbacks.Callback):
    """Adds the learning rate the last step used to the epoch logs (and so to MLflow)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.model.optimizer.learning_rate)


class LiveMetrics(DVCLiveCallback):
    """DVCLive's Keras callback, its step the caption pairs seen, rebuilt from the checkpoint.

    The step is `pairs_seen` (the checkpoint adds it to the logs before this
    callback runs), as in MLflow, so runs with different epoch lengths or data
    sizes line up. Metrics follow DVCLive's Keras names: `loss` is
    `train/loss`, `val_CIDEr` is `eval/CIDEr`. `directory` starts empty; a
    resumed run writes the epochs it already ran first (`resume`), so the
    files are the same as an uninterrupted run's. No dvc.yaml and no
    experiment of its own: the pipeline's dvc.yaml declares the files and
    `dvc exp run` makes the experiment.
    """

    def __init__(self, directory: str | Path):
        super().__init__(live=Live(str(directory), dvcyaml=False, save_dvc_exp=False))

    def resume(self, history: list[dict]) -> None:
        """Log the epochs a resumed run already ran (the checkpoint's history rows)."""
        for row in history:
            self.on_epoch_end(row["epoch"] - 1, {k: v for k, v in row.items() if k != "epoch"})

    def on_epoch_end(self, epoch, logs=None):
        # Floats, as the checkpoint's history keeps them: a resumed run writes the same text.
        logs = {name: float(value) for name, value in (logs or {}).items()}
        self.live.step = int(logs.get("pairs_seen", epoch + 1))
        super().on_epoch_end(epoch, logs)


def val_sample(val: CaptionSet, size: int, seed: int) -> np.ndarray:
    """A fixed, seeded sample of val image ids (sorted), the same every epoch and on resume."""
    ids = np.unique(val.image_ids)
    if size < len(ids):
        ids = np.sort(np.random.default_rng(seed).choice(ids, size, replace=False))
    return ids


def epoch_scorers(
    store: FeatureStore,
    val: CaptionSet,
    params: TrainParams,
    val_references: dict[int, list[str]] | None,
    val_scorer: SourceScorer | None,
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
        scorers.append(ValCaptionScore(store, sample, val_references, val_scorer))
    return scorers
