"""How long a run trains: the budget in caption pairs, and when it stops early.

`TrainingBudget` turns `train.budget_pairs` / `train.epoch_pairs` into epochs
and steps for one data set; `StoppingRule` reads the selection metric's
smoothed history and says when a run stops and when it ended still improving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from captioning.config import TrainParams
from captioning.training.batches import BatchPlan, CaptionSet


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
