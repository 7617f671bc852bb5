"""The scenes source: deterministic generation, a layout the validate stage accepts, its scorer.

The generated folder is built once per module (a few dozen small images); the
validate stage's own `validate_dataset` checks it; the grammar and the scorer
are checked on every generated caption and on hand-written wrong ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioning.config import DataParams, SplitParams, ValidateParams
from captioning.data import demo_scenes, scenes, scenes_captions, scenes_drawing
from captioning.data.scenes_captions import TRUTH_RULES
from captioning.data.scorers import TruthScorer, boxes_coverage
from captioning.data.sources import prepare_source, source_scorer
from captioning.data.validation import validate_dataset

N_TRAIN, N_VAL, SEED = 24, 10, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes") / "scenes"
    scenes.generate_scenes(folder, N_TRAIN, N_VAL, SEED)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _captions(root: Path, split: str = "train") -> dict[int, list[str]]:
    data = json.loads((root / "annotations" / f"captions_{split}2014.json").read_text())
    out: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out


def test_same_seed_same_bytes_other_seed_differs_rerun_is_a_no_op(root, tmp_path):
    again = tmp_path / "again"
    scenes.generate_scenes(again, N_TRAIN, N_VAL, SEED)
    assert _files(again) == _files(root)
    stamps = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    scenes.generate_scenes(again, N_TRAIN, N_VAL, SEED)
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == stamps
    other = tmp_path / "other"
    scenes.generate_scenes(other, N_TRAIN, N_VAL, SEED + 1)
    assert (
        _files(other)["annotations/captions_train2014.json"]
        != _files(root)["annotations/captions_train2014.json"]
    )


def test_interrupted_run_is_completed_identically(root, tmp_path):
    broken = tmp_path / "broken"
    scenes.generate_scenes(broken, N_TRAIN, N_VAL, SEED)
    (broken / scenes.MARKER_NAME).unlink()
    next((broken / "val2014").glob("*.jpg")).unlink()
    (broken / "annotations" / "captions_train2014.json").write_text("{")
    scenes.generate_scenes(broken, N_TRAIN, N_VAL, SEED)
    assert _files(broken) == _files(root)


def test_the_validate_stage_accepts_the_layout(root, tmp_path):
    summary = validate_dataset(
        root,
        SplitParams(),
        ValidateParams(),
        tmp_path / "captions.parquet",
        tmp_path / "report",
        tmp_path / "quarantine.json",
    )
    table = pd.read_parquet(tmp_path / "captions.parquet")
    assert summary["success"] and summary["counts"]["images_kept"] == N_TRAIN + N_VAL
    assert (table.groupby("image_id").size() == scenes_captions.CAPTIONS_PER_IMAGE).all()
    assert set(table["split"]) == {"train", "val", "test"}
    assert set(zip(table["width"], table["height"], strict=True)) == {(320, 240)}


def test_prepare_source_writes_scenes_and_finds_their_scorer(tmp_path):
    params = DataParams(source="scenes", demo_train_images=3, demo_val_images=2, seed=SEED)
    layout = prepare_source(params, tmp_path / "raw")
    assert layout == tmp_path / "raw" / "scenes"
    scorer = source_scorer(tmp_path / "raw")
    assert isinstance(scorer, TruthScorer) and scorer.rules is TRUTH_RULES


def test_the_data_differs_from_the_demo(root):
    words = {w for cs in _captions(root).values() for c in cs for w in c.lower().split()}
    assert not words & {*demo_scenes.KINDS, *demo_scenes.COLOURS, "corner", "center"}
    assert {"two", "three"} & words and {"striped", "spotted", "checkered"} & words
    with Image.open(next((root / "train2014").glob("*.jpg"))) as image:
        assert image.size == (scenes_drawing.WIDTH, scenes_drawing.HEIGHT) != (299, 299)


def test_boxes_lie_inside_the_picture_and_groups_match_the_instances(root):
    groups = scenes.load_groups(root / "annotations" / "instances_train2014.json")
    assert len(groups) == N_TRAIN
    for image_groups in groups.values():
        assert 1 <= len(image_groups) <= 3
        assert len({(g["kind"], g["colour"]) for g in image_groups}) == len(image_groups)
        assert sum(g["count"] for g in image_groups) <= scenes_drawing.MAX_OBJECTS
        for g in image_groups:
            assert len(g["boxes"]) == g["count"]
            for x, y, w, h in g["boxes"]:
                assert 0 <= x <= x + w <= 320 and 0 <= y <= y + h <= 240 and min(w, h) > 5


def test_every_caption_but_gists_names_the_groups_and_the_scorer_agrees(root):
    groups = scenes.load_groups(root / "annotations" / "instances_train2014.json")
    scorer = TruthScorer(groups, TRUTH_RULES)
    for image_id, captions in _captions(root).items():
        ids = [image_id] * len(captions)
        columns, corpus = scorer.caption_scores(ids, captions)
        gists = [any(m in c for m in ("other shapes", "other things")) for c in captions]
        assert columns["objects_correct"] == [not g for g in gists], captions
        assert sum(gists) <= 1 and len(set(captions)) == len(captions)
        assert corpus["object_accuracy"] == pytest.approx(1 - sum(gists) / len(captions))


TRUTH = [
    {"kind": "cross", "colour": "orange", "texture": "striped", "count": 2, "boxes": []},
    {"kind": "ring", "colour": "pink", "texture": "plain", "count": 1, "boxes": []},
]


@pytest.mark.parametrize(
    "caption, correct",
    [
        ("two striped orange crosses and a pink ring on a rug", True),
        ("A pink hoop is left of a pair of orange crosses with stripes .", True),
        ("on the tiles there are two orange crosses and one plain pink ring", True),
        ("three orange crosses and a pink ring", False),  # wrong count
        ("two orange cross and a pink ring", False),  # count and number disagree
        ("two spotted orange crosses and a pink ring", False),  # wrong texture
        ("two orange crosses and a pink ring with stripes", False),  # wrong texture, after
        ("two orange crosses and a cyan ring", False),  # wrong colour
        ("two orange crosses and some other shapes", False),  # a group left out
        ("two orange crosses, a pink ring and a black arrow", False),  # one too many
        ("crosses and a pink ring", False),  # no count
    ],
)
def test_caption_correct_on_known_captions(caption, correct):
    assert scenes_captions.caption_correct(caption, TRUTH) is correct


def test_parse_caption_reads_counts_colours_and_textures():
    assert scenes_captions.parse_caption(
        "a pair of cyan lozenges with dots near an orange arrow"
    ) == [
        scenes_captions.Group("diamond", "cyan", 2, "spotted"),
        scenes_captions.Group("arrow", "orange", 1, None),
    ]


def test_grounding_is_one_when_the_noun_looks_inside_its_box_and_chance_otherwise():
    truth = [{"kind": "ring", "colour": "pink", "texture": "plain", "count": 1,
              "boxes": [[0.0, 0.0, 160.0, 120.0]]}]  # fmt: skip
    coverage = boxes_coverage(truth[0]["boxes"], 8, 320, 240)
    assert coverage.sum() == pytest.approx(16)  # the top left quarter of an 8x8 grid
    caption = "a pink ring on a rug"
    inside = np.zeros((5, 64))
    inside[2] = coverage / coverage.sum()
    uniform = np.full((5, 64), 1 / 64)
    scorer = TruthScorer({1: truth}, TRUTH_RULES)
    assert scorer.attention_scores([1], [caption], [inside]) == {
        "grounding": pytest.approx(1.0),
        "grounding_chance": pytest.approx(0.25),
        "grounded_nouns": 1,
    }
    assert scorer.attention_scores([1], [caption], [uniform])["grounding"] == pytest.approx(0.25)


def test_bad_arguments_fail_loudly(tmp_path):
    for args in ((-1, 2, 0), (2, 2.5, 0), (2, 2, True)):
        with pytest.raises(ValueError):
            scenes.generate_scenes(tmp_path / "x", *args)
