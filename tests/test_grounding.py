"""The truth scorer on the demo: box coverage, per-noun attention mass, object accuracy, plug-in."""

import json

import numpy as np
import pytest

from captioning.data.demo_captions import TRUTH_RULES
from captioning.data.scorers import (
    TruthScorer,
    box_coverage,
    grounding_scores,
    noun_groundings,
)

OBJECTS = [
    {"kind": "circle", "colour": "red", "position": "top left", "bbox": [0, 0, 74.75, 74.75]},
    {
        "kind": "star",
        "colour": "blue",
        "position": "bottom right",
        "bbox": [224.25, 224.25, 74.75, 74.75],
    },
]


def test_box_coverage_counts_partial_cells():
    cov = box_coverage([0, 0, 74.75, 74.75], 8, 299, 299)  # exactly the top-left 2x2 cells
    assert cov.shape == (64,)
    np.testing.assert_allclose(cov.reshape(8, 8)[:2, :2], 1.0)
    assert cov.sum() == pytest.approx(4.0)
    half = box_coverage([0, 0, 299 / 16, 299 / 8], 8, 299, 299)
    assert half[0] == pytest.approx(0.5) and half[1] == 0


def test_attention_on_the_named_box_scores_one_and_uniform_scores_the_area():
    caption = "a red circle in the top left corner and a blue star in the bottom right corner"
    words = caption.split()
    focused = np.zeros((len(words), 64))
    focused[words.index("circle"), box_coverage(OBJECTS[0]["bbox"], 8, 299, 299) > 0] = 0.25
    focused[words.index("star"), box_coverage(OBJECTS[1]["bbox"], 8, 299, 299) > 0] = 0.25
    pairs = noun_groundings(TRUTH_RULES, caption, focused, OBJECTS)
    assert [round(m, 6) for m, _ in pairs] == [1.0, 1.0]
    uniform = np.full((len(words), 64), 1 / 64)
    scores = grounding_scores(TRUTH_RULES, [caption], [uniform], [OBJECTS])
    assert scores["grounding"] == pytest.approx(scores["grounding_chance"])
    assert scores["grounding_chance"] == pytest.approx(4 / 64)
    assert scores["grounded_nouns"] == 2


def test_wrong_mentions_are_not_grounded():
    caption = "a green circle in the top left corner"  # wrong colour: no such object
    assert noun_groundings(TRUTH_RULES, caption, np.full((8, 64), 1 / 64), OBJECTS) == []
    scores = grounding_scores(TRUTH_RULES, [caption], [np.zeros((8, 64))], [OBJECTS])
    assert scores["grounded_nouns"] == 0


def test_the_demo_scorer_gives_object_accuracy_per_image_and_grounding_per_corpus():
    scorer = TruthScorer({1: OBJECTS, 2: OBJECTS[:1]}, TRUTH_RULES)
    right = "a red circle in the top left corner and a blue star in the bottom right corner"
    columns, corpus = scorer.caption_scores([1, 2], [right, "a blue circle in the top left"])
    assert columns == {"objects_correct": [True, False]}
    assert corpus == {"object_accuracy": 0.5}
    uniform = np.full((len(right.split()), 64), 1 / 64)
    scores = scorer.attention_scores([1], [right], [uniform])
    assert scores == grounding_scores(TRUTH_RULES, [right], [uniform], [OBJECTS])


def test_only_a_source_with_its_own_truth_has_a_scorer(tmp_path):
    from captioning.data.sources import source_scorer, write_dataset_ref

    annotations = tmp_path / "coco" / "annotations"
    annotations.mkdir(parents=True)
    instances = {
        "images": [{"id": 7}],
        "categories": [{"id": 1, "name": "circle"}],
        "annotations": [
            {
                "image_id": 7,
                "category_id": 1,
                "bbox": [0, 0, 10, 10],
                "attributes": {"colour": "red", "size": "small", "position": "top left"},
            }
        ],
    }
    for split in ("train", "val"):
        (annotations / f"instances_{split}2014.json").write_text(json.dumps(instances))
    write_dataset_ref(tmp_path, "demo", tmp_path / "coco")
    scorer = source_scorer(tmp_path)
    assert isinstance(scorer, TruthScorer) and scorer.rules is TRUTH_RULES
    assert scorer.caption_scores([7], ["a red circle in the top left corner"])[1] == {
        "object_accuracy": 1.0
    }
    write_dataset_ref(tmp_path, "local", tmp_path / "coco")
    assert source_scorer(tmp_path) is None
