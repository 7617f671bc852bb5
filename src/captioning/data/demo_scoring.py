"""The demo's own scores (its `SourceScorer`): object accuracy and attention grounding.

Object accuracy is the share of captions that name every object of the scene
with its kind, colour and position (the demo grammar, `demo_captions`).
Grounding asks whether the model looks at the object it names.

For every shape noun a caption emits, the demo grammar tells which object the
noun refers to (its kind, colour and position); where that matches a real
object of the scene, we measure the share of that word's attention mass that
falls inside the object's bounding box. Averaged over the split it is
`grounding`; `grounding_chance` is the mean share of the image the same boxes
cover, i.e. what uniform attention would score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from captioning.data.demo_captions import KIND_WORDS, caption_correct, parse_caption
from captioning.data.demo_scenes import IMAGE_SIZE

_NOUNS = {word: kind for kind, words in KIND_WORDS.items() for word in words}


def box_coverage(bbox: list[float], grid: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(grid * grid,) share of each attention cell's area inside bbox [x, y, w, h]."""
    x, y, w, h = bbox
    edges = np.linspace(0, image_size, grid + 1)  # cell boundaries in pixels
    cover_x = np.clip(np.minimum(edges[1:], x + w) - np.maximum(edges[:-1], x), 0, None)
    cover_y = np.clip(np.minimum(edges[1:], y + h) - np.maximum(edges[:-1], y), 0, None)
    cell = image_size / grid
    return (np.outer(cover_y, cover_x) / (cell * cell)).reshape(-1)  # row-major like the features


def noun_groundings(
    caption: str, attention: np.ndarray, objects: list[dict]
) -> list[tuple[float, float]]:
    """[(attention mass in the named object's box, box share of the image)] per grounded noun.

    attention: (words, L) maps of the caption's words, in order.
    """
    words = caption.split()
    noun_steps = [i for i, w in enumerate(words) if w in _NOUNS]
    named = [t for t in parse_caption(caption) if t[0] is not None]
    if len(named) != len(noun_steps):
        return []  # the grammar could not pair nouns with mentions: nothing to ground
    grid = int(round(np.sqrt(attention.shape[1])))
    truth = {(o["kind"], o["colour"], o["position"]): o for o in objects}
    out = []
    for step, triple in zip(noun_steps, named, strict=True):
        obj = truth.get(triple)
        if obj is None or step >= len(attention):
            continue  # a wrong mention has no box to look at
        coverage = box_coverage(obj["bbox"], grid)
        mass = float(np.sum(attention[step] * coverage))
        share = float(coverage.sum() / (grid * grid))
        out.append((mass, share))
    return out


def grounding_scores(
    captions: list[str], attentions: list[np.ndarray], objects: list[list[dict]]
) -> dict[str, float]:
    """Mean attention-in-box (`grounding`) and the uniform baseline over all grounded nouns."""
    pairs = [
        pair
        for caption, attention, objs in zip(captions, attentions, objects, strict=True)
        for pair in noun_groundings(caption, attention, objs)
    ]
    if not pairs:
        return {"grounding": 0.0, "grounding_chance": 0.0, "grounded_nouns": 0}
    mass, share = np.asarray(pairs).T
    return {
        "grounding": float(mass.mean()),
        "grounding_chance": float(share.mean()),
        "grounded_nouns": len(pairs),
    }


class DemoScorer:
    """The demo's `SourceScorer`, from the object truth of every image (`load_objects`)."""

    def __init__(self, objects: dict[int, list[dict]]):
        self.objects = objects

    def caption_scores(
        self, image_ids: Sequence[int], captions: Sequence[str]
    ) -> tuple[dict[str, list], dict[str, float]]:
        """Per image `objects_correct` (every object named right); corpus `object_accuracy`."""
        correct = [
            caption_correct(c, self.objects.get(int(i), []))
            for i, c in zip(image_ids, captions, strict=True)
        ]
        return {"objects_correct": correct}, {"object_accuracy": float(np.mean(correct))}

    def attention_scores(
        self, image_ids: Sequence[int], captions: Sequence[str], attentions: Sequence[np.ndarray]
    ) -> dict[str, float]:
        """`grounding`, `grounding_chance` and `grounded_nouns` (`grounding_scores`)."""
        truth = [self.objects.get(int(i), []) for i in image_ids]
        return grounding_scores(list(captions), list(attentions), truth)
