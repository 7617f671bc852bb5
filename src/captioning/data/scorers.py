"""The plug-in through which a data source adds scores only it can compute, and the truth scorer.

Training and evaluation score captions with coco-caption's metrics, which need
nothing but reference sentences. A source that knows more about its images
(the generated ones know every object's kind, colour, place and box) can
provide a `SourceScorer`; `captioning.data.sources.source_scorer` finds the one
of the current source, and the training loop and the evaluate stage call it
without knowing which data set it is.

`TruthScorer` is that scorer for any source with ground-truth objects per
image; the source supplies only its `TruthRules` (its grammar's grading and
reading of captions, and how a named object's boxes cover the attention grid).
`object_accuracy` is the share of captions the grammar grades correct for
their image. `grounding` asks whether the model looks at the object it names:
for every object noun a caption emits that names a real object of the image,
the share of that word's attention mass inside the object's boxes, averaged
over the split; `grounding_chance` is the mean share of the grid the same
boxes cover, i.e. what uniform attention would score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
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


@dataclasses.dataclass(frozen=True)
class TruthRules:
    """What a source with ground-truth objects tells `TruthScorer` (one image's truth: a list).

    nouns: the words that name an object (one attention step each).
    caption_correct(caption, truth): the caption names the image's objects right.
    mentions(caption): a key per object noun, in order; fewer or more than the
        nouns when the grammar cannot pair them (nothing of that caption is grounded).
    regions(truth): key -> the boxes [x, y, w, h] of the object(s) a mention names.
    coverage(boxes, grid): (grid * grid,) share of each attention cell inside the boxes.
    """

    nouns: frozenset[str]
    caption_correct: Callable[[str, list[dict]], bool]
    mentions: Callable[[str], list[Hashable]]
    regions: Callable[[list[dict]], dict[Hashable, list[list[float]]]]
    coverage: Callable[[list[list[float]], int], np.ndarray]


def box_coverage(bbox: Sequence[float], grid: int, width: float, height: float) -> np.ndarray:
    """(grid * grid,) exact share of each attention cell's area inside one box [x, y, w, h]."""
    x, y, w, h = bbox
    columns, rows = np.linspace(0, width, grid + 1), np.linspace(0, height, grid + 1)  # cell edges
    cover_x = np.clip(np.minimum(columns[1:], x + w) - np.maximum(columns[:-1], x), 0, None)
    cover_y = np.clip(np.minimum(rows[1:], y + h) - np.maximum(rows[:-1], y), 0, None)
    cell_area = (width / grid) * (height / grid)
    return (np.outer(cover_y, cover_x) / cell_area).reshape(-1)  # row-major like the features


def boxes_coverage(
    boxes: Sequence[Sequence[float]], grid: int, width: float, height: float
) -> np.ndarray:
    """(grid * grid,) share of each attention cell inside the union of boxes [x, y, w, h]."""
    fine = 4 * grid  # the union is rasterised on a grid 4x finer than the cells
    inside = np.zeros((fine, fine), bool)
    centres = (np.arange(fine) + 0.5) / fine
    for x, y, w, h in boxes:
        cols = (centres >= x / width) & (centres <= (x + w) / width)
        rows = (centres >= y / height) & (centres <= (y + h) / height)
        inside |= np.outer(rows, cols)
    cells = inside.reshape(grid, 4, grid, 4).mean(axis=(1, 3))  # (grid, grid)
    return cells.reshape(-1)  # row-major like the features


def noun_groundings(
    rules: TruthRules, caption: str, attention: np.ndarray, truth: list[dict]
) -> list[tuple[float, float]]:
    """[(attention mass in the named object's boxes, their share of the grid)] per grounded noun.

    attention: (words, L) maps of the caption's words, in order.
    """
    steps = [i for i, word in enumerate(caption.split()) if word in rules.nouns]
    named = rules.mentions(caption)
    if len(steps) != len(named):
        return []  # the grammar could not pair nouns with mentions: nothing to ground
    grid = int(round(np.sqrt(attention.shape[1])))
    regions = rules.regions(truth)
    pairs = []
    for step, key in zip(steps, named, strict=True):
        if key not in regions or step >= len(attention):
            continue  # a wrong mention has no box to look at
        coverage = rules.coverage(regions[key], grid)
        pairs.append((float(np.sum(attention[step] * coverage)), float(coverage.mean())))
    return pairs


def grounding_scores(
    rules: TruthRules,
    captions: Sequence[str],
    attentions: Sequence[np.ndarray],
    truths: Sequence[list[dict]],
) -> dict[str, float]:
    """`grounding`, `grounding_chance` and `grounded_nouns` over every groundable noun."""
    pairs = [
        pair
        for caption, attention, truth in zip(captions, attentions, truths, strict=True)
        for pair in noun_groundings(rules, caption, attention, truth)
    ]
    if not pairs:
        return {"grounding": 0.0, "grounding_chance": 0.0, "grounded_nouns": 0}
    mass, share = np.asarray(pairs).T
    return {
        "grounding": float(mass.mean()),
        "grounding_chance": float(share.mean()),
        "grounded_nouns": len(pairs),
    }


class TruthScorer:
    """A `SourceScorer` from every image's ground-truth objects and the source's `TruthRules`."""

    def __init__(self, truth: dict[int, list[dict]], rules: TruthRules):
        self.truth = truth
        self.rules = rules

    def caption_scores(
        self, image_ids: Sequence[int], captions: Sequence[str]
    ) -> tuple[dict[str, list], dict[str, float]]:
        """Per image `objects_correct` (every object named right); corpus `object_accuracy`."""
        correct = [
            self.rules.caption_correct(c, self.truth.get(int(i), []))
            for i, c in zip(image_ids, captions, strict=True)
        ]
        return {"objects_correct": correct}, {"object_accuracy": float(np.mean(correct))}

    def attention_scores(
        self, image_ids: Sequence[int], captions: Sequence[str], attentions: Sequence[np.ndarray]
    ) -> dict[str, float]:
        """`grounding`, `grounding_chance` and `grounded_nouns` (`grounding_scores`)."""
        truths = [self.truth.get(int(i), []) for i in image_ids]
        return grounding_scores(self.rules, captions, attentions, truths)
