"""The scenes data set's own scores (its `SourceScorer`): object accuracy and grounding.

`object_accuracy` is the share of captions that name every group of the
scene with its kind, colour and count and nothing else, any texture they state
being the right one (`scenes_captions.caption_correct`); a gist caption that
names only the biggest group is wrong by this measure, as it should be for a
model. `grounding` is, for every token noun a caption emits that names a real
group, the share of that word's attention mass inside the union of the
group's boxes; `grounding_chance` is the share of the picture those boxes
cover (what uniform attention scores). The picture is 4:3 and the feature map
square, so boxes are measured in fractions of the width and height, as the
features stage stretches the picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from captioning.data.scenes_captions import KIND_WORDS, caption_correct, parse_caption
from captioning.data.scenes_drawing import HEIGHT, WIDTH

_NOUNS = {word for pairs in KIND_WORDS.values() for pair in pairs for word in pair}


def boxes_coverage(boxes: list[list[float]], grid: int) -> np.ndarray:
    """(grid * grid,) share of each attention cell inside the union of boxes [x, y, w, h]."""
    fine = 4 * grid  # the union is rasterised on a grid 4x finer than the cells
    inside = np.zeros((fine, fine), bool)
    centres = (np.arange(fine) + 0.5) / fine
    for x, y, w, h in boxes:
        cols = (centres >= x / WIDTH) & (centres <= (x + w) / WIDTH)
        rows = (centres >= y / HEIGHT) & (centres <= (y + h) / HEIGHT)
        inside |= np.outer(rows, cols)
    cells = inside.reshape(grid, 4, grid, 4).mean(axis=(1, 3))  # (grid, grid)
    return cells.reshape(-1)  # row-major like the features


def grounding_scores(
    captions: Sequence[str], attentions: Sequence[np.ndarray], groups: Sequence[list[dict]]
) -> dict[str, float]:
    """`grounding`, `grounding_chance` and `grounded_nouns` over every groundable noun."""
    pairs = []
    for caption, attention, truth in zip(captions, attentions, groups, strict=True):
        steps = [i for i, word in enumerate(caption.split()) if word in _NOUNS]
        named = parse_caption(caption)
        if len(steps) != len(named):
            continue
        boxes = {(g["kind"], g["colour"]): g["boxes"] for g in truth}
        grid = int(round(np.sqrt(attention.shape[1])))
        for step, group in zip(steps, named, strict=True):
            if (group.kind, group.colour) not in boxes or step >= len(attention):
                continue
            coverage = boxes_coverage(boxes[group.kind, group.colour], grid)
            pairs.append((float(np.sum(attention[step] * coverage)), float(coverage.mean())))
    if not pairs:
        return {"grounding": 0.0, "grounding_chance": 0.0, "grounded_nouns": 0}
    mass, share = np.asarray(pairs).T
    return {
        "grounding": float(mass.mean()),
        "grounding_chance": float(share.mean()),
        "grounded_nouns": len(pairs),
    }


class ScenesScorer:
    """The scenes' `SourceScorer`, from every image's groups (`scenes.load_groups`)."""

    def __init__(self, groups: dict[int, list[dict]]):
        self.groups = groups

    def caption_scores(
        self, image_ids: Sequence[int], captions: Sequence[str]
    ) -> tuple[dict[str, list], dict[str, float]]:
        """Per image `objects_correct`; corpus `object_accuracy`."""
        correct = [
            caption_correct(c, self.groups.get(int(i), []))
            for i, c in zip(image_ids, captions, strict=True)
        ]
        return {"objects_correct": correct}, {"object_accuracy": float(np.mean(correct))}

    def attention_scores(
        self, image_ids: Sequence[int], captions: Sequence[str], attentions: Sequence[np.ndarray]
    ) -> dict[str, float]:
        """`grounding`, `grounding_chance` and `grounded_nouns` (`grounding_scores`)."""
        truth = [self.groups.get(int(i), []) for i in image_ids]
        return grounding_scores(captions, attentions, truth)
