"""The plug-in through which a data source adds scores only it can compute.

Training and evaluation score captions with coco-caption's metrics, which need
nothing but reference sentences. A source that knows more about its images
(the demo knows every object's kind, colour, position and box) can provide a
`SourceScorer`; `captioning.data.sources.source_scorer` finds the one of the
current source, and the training loop and the evaluate stage call it without
knowing which data set it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class SourceScorer(Protocol):
    """Scores a data source computes for generated captions (and their attention)."""

    def caption_scores(
        self, image_ids: Sequence[int], captions: Sequence[str]
    ) -> tuple[dict[str, list], dict[str, float]]:
        """From the captions alone: (per-image columns, corpus figures).

        Training logs the corpus figures each epoch as `val_<name>`; the
        evaluate stage adds the columns to the per-image table and the figures
        to the metrics.
        """
        ...

    def attention_scores(
        self, image_ids: Sequence[int], captions: Sequence[str], attentions: Sequence[np.ndarray]
    ) -> dict[str, float]:
        """Corpus figures that need where the model looked: attentions[i] is (T, L) of image i."""
        ...
