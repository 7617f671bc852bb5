"""The demo data set (`demo`, `demo_scenes`, `demo_captions`): layout, pictures, grammar.

One small data set (12 train + 6 val images) is generated per module and read
back through the public API; the grammar is checked against every caption the
generator wrote, against the model's punctuation-free tokenisation of them, and
against deliberately wrong captions.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.atomic_files import temporary_sibling
from captioning.data import demo, demo_captions, demo_scenes
from captioning.data.synthetic import read_instances
from captioning.data.text import clean_caption

N_TRAIN, N_VAL, SEED = 12, 6, 7
SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    demo.generate_demo(path, N_TRAIN, N_VAL, SEED)
    return path


def _load(root: Path, kind: str, split: str) -> dict:
    return json.loads((root / "annotations" / f"{kind}_{split}2014.json").read_text())


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _all_objects(root: Path) -> dict[int, list[dict]]:
    objects = {}
    for split in SPLITS:
        objects.update(read_instances(root / "annotations" / f"instances_{split}2014.json"))
    return objects


def _simple_caption(objects: list[dict]) -> str:
    return " and ".join(
        f"a {o['colour']} {o['kind']} {demo_captions.POSITION_PHRASES[o['position']][0]}"
        for o in objects
    )


# --- layout and schemas ------------------------------------------------------------------------


def test_layout_and_file_names_match_coco(root):
    assert sorted(p.name for p in (root / "annotations").iterdir()) == [
        "captions_train2014.json", "captions_val2014.json",
        "instances_train2014.json", "instances_val2014.json",
    ]  # fmt: skip
    ids = {}
    for split in SPLITS:
        names = sorted(p.name for p in (root / f"{split}2014").iterdir())
        assert all(re.fullmatch(rf"COCO_{split}2014_\d{{12}}\.jpg", n) for n in names)
        ids[split] = {int(n[-16:-4]) for n in names}
        images = _load(root, "captions", split)["images"]
        assert names == sorted(i["file_name"] for i in images)
        for image in images:
            assert image["file_name"] == f"COCO_{split}2014_{image['id']:012d}.jpg"
            assert image["coco_url"] == (
                f"http://images.cocodataset.org/{split}2014/{image['file_name']}"
            )
    assert (len(ids["train"]), len(ids["val"])) == (N_TRAIN, N_VAL)
    assert not ids["train"] & ids["val"]


def test_captions_schema(root):
    caption_ids = []
    for split in SPLITS:
        data = _load(root, "captions", split)
        assert {"info", "licenses", "images", "annotations"} <= set(data)
        licenses = {lic["id"] for lic in data["licenses"]}
        for image in data["images"]:
            assert set(image) == {"id", "file_name", "width", "height", "coco_url",
                                  "flickr_url", "date_captured", "license"}  # fmt: skip
            assert (image["width"], image["height"]) == (299, 299)
            assert image["license"] in licenses
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", image["date_captured"])
        image_ids = [i["id"] for i in data["images"]]
        assert len(set(image_ids)) == len(image_ids)
        per_image = {i: [] for i in image_ids}
        for ann in data["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"}
            per_image[ann["image_id"]].append(ann["caption"])  # KeyError: no such image
            caption_ids.append(ann["id"])
        for captions in per_image.values():
            assert len(captions) == 5
            assert len({clean_caption(c) for c in captions}) == 5  # worded differently
    assert len(set(caption_ids)) == len(caption_ids) == 5 * (N_TRAIN + N_VAL)


def test_instances_schema(root):
    instance_ids = []
    for split in SPLITS:
        data = _load(root, "instances", split)
        assert data["images"] == _load(root, "captions", split)["images"]
        assert [c["name"] for c in data["categories"]] == list(demo_scenes.KINDS)
        categories = {c["id"] for c in data["categories"]}
        image_ids = {i["id"] for i in data["images"]}
        counts = dict.fromkeys(image_ids, 0)
        for ann in data["annotations"]:
            assert ann["image_id"] in image_ids and ann["category_id"] in categories
            assert ann["iscrowd"] == 0 and ann["area"] > 0
            assert all(isinstance(v, float) for v in ann["bbox"]) and len(ann["bbox"]) == 4
            assert ann["attributes"]["colour"] in demo_scenes.COLOURS
            assert ann["attributes"]["size"] in demo_scenes.SIZES
            assert ann["attributes"]["position"] in demo_scenes.POSITIONS
            counts[ann["image_id"]] += 1
            instance_ids.append(ann["id"])
        assert all(1 <= n <= 3 for n in counts.values())
    assert len(set(instance_ids)) == len(instance_ids)


def test_read_instances_gives_each_image_distinct_cells(root):
    objects = _all_objects(root)
    assert len(objects) == N_TRAIN + N_VAL
    for objs in objects.values():
        assert set(objs[0]) == {"kind", "colour", "size", "position", "bbox"}
        assert len({o["position"] for o in objs}) == len(objs)
        assert {o["kind"] for o in objs} <= set(demo_scenes.KINDS)


# --- determinism and reruns ---------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
    summary = demo.generate_demo(tmp_path / "again", N_TRAIN, N_VAL, SEED)
    assert summary == {"train_images": N_TRAIN, "val_images": N_VAL,
                       "captions": 5 * (N_TRAIN + N_VAL)}  # fmt: skip
    assert _tree(tmp_path / "again") == _tree(root)
    demo.generate_demo(tmp_path / "other", N_TRAIN, N_VAL, SEED + 1)
    other = _tree(tmp_path / "other")
    assert (
        other["annotations/captions_train2014.json"]
        != _tree(root)["annotations/captions_train2014.json"]
    )
    assert not set(other) & {k for k in _tree(root) if k.endswith(".jpg")}  # other ids


def test_rerun_is_a_no_op(root):
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    demo.generate_demo(root, N_TRAIN, N_VAL, SEED)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_interrupted_run_is_completed_identically(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    # What a run killed part-way leaves: no marker, no late annotations, temp files.
    (copy / demo.MARKER_NAME).unlink()
    (copy / "annotations" / "captions_val2014.json").unlink()
    next((copy / "val2014").iterdir()).unlink()
    for half_written in (
        copy / "train2014" / "COCO_train2014_000000000000.jpg",
        copy / "annotations" / "captions_val2014.json",
        copy / demo.MARKER_NAME,
    ):
        temporary_sibling(half_written).write_bytes(b"partial")
    demo.generate_demo(copy, N_TRAIN, N_VAL, SEED)
    assert _tree(copy) == _tree(root)


def test_other_parameters_regenerate_without_leftovers(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    demo.generate_demo(copy, 4, 2, SEED)
    demo.generate_demo(tmp_path / "fresh", 4, 2, SEED)
    assert _tree(copy) == _tree(tmp_path / "fresh")
    assert len(list((copy / "train2014").iterdir())) == 4


@pytest.mark.parametrize("args", [(-1, 2, 0), (2, 2, -3), (2.0, 2, 0), (True, 2, 0)])
def test_bad_arguments_fail_loudly(tmp_path, args):
    with pytest.raises(ValueError):
        demo.generate_demo(tmp_path, *args)


# --- pictures ----------------------------------------------------------------------------------


def test_images_decode_as_299_rgb_jpeg(root):
    for path in [*(root / "train2014").iterdir(), *(root / "val2014").iterdir()]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (299, 299))


def test_bboxes_sit_in_their_cells_and_frame_the_drawn_object(root):
    objects = _all_objects(root)
    cell = 299 / 3
    for split in SPLITS:
        for image in _load(root, "captions", split)["images"]:
            pixels = np.asarray(Image.open(root / f"{split}2014" / image["file_name"]), np.float32)
            objs = objects[image["id"]]
            for obj in objs:
                x, y, w, h = obj["bbox"]
                row, col = demo_scenes.POSITION_CELLS[obj["position"]]
                assert col * cell <= x and x + w <= (col + 1) * cell
                assert row * cell <= y and y + h <= (row + 1) * cell
                fill = np.array(demo_scenes.FILL_RGB[obj["colour"]], np.float32)
                cx, cy = int(x + w / 2), int(y + h / 2)
                window = pixels[cy - 4 : cy + 5, cx - 4 : cx + 5].reshape(-1, 3)
                # Stripes and dots are near-black or near-white: the fill is the rest.
                accent = (window.max(1) < 70) | (window.min(1) > 200)
                inside = window[~accent].mean(0)
                # The nearest fill colour at the box's centre is the object's own colour.
                nearest = min(
                    demo_scenes.COLOURS,
                    key=lambda c: np.linalg.norm(inside - demo_scenes.FILL_RGB[c]),
                )
                assert nearest == obj["colour"]
                # A band just outside the box (other objects' boxes excluded) is background.
                band = np.zeros((299, 299), bool)
                band[max(int(y) - 7, 0) : int(y + h) + 8, max(int(x) - 7, 0) : int(x + w) + 8] = (
                    True
                )
                for other in objs:
                    ox, oy, ow, oh = other["bbox"]
                    band[
                        max(int(oy) - 3, 0) : int(oy + oh) + 4,
                        max(int(ox) - 3, 0) : int(ox + ow) + 4,
                    ] = False
                outside = pixels[band].mean(0)
                assert np.linalg.norm(inside - fill) + 25 < np.linalg.norm(outside - fill)


# --- the grammar --------------------------------------------------------------------------------


def test_every_generated_caption_parses_back_to_the_truth(root):
    objects = _all_objects(root)
    for split in SPLITS:
        for ann in _load(root, "captions", split)["annotations"]:
            truth = objects[ann["image_id"]]
            for text in (ann["caption"], clean_caption(ann["caption"]), ann["caption"].upper()):
                assert demo_captions.caption_correct(text, truth), (
                    text,
                    truth,
                    demo_captions.parse_caption(text),
                )


@pytest.mark.parametrize(
    ("caption", "triples"),
    [
        ("In the middle of the picture is a small blue square.", [("square", "blue", "center")]),
        ("there is a large red circle at the upper left", [("circle", "red", "top left")]),
        ("a violet disc on the right hand side", [("circle", "purple", "right")]),
        (
            "at the top left is a red box at the bottom sits a blue star",
            [("square", "red", "top left"), ("star", "blue", "bottom")],
        ),
        (
            "two shapes: a green triangle in the lower right corner, and a yellow star at the top",
            [("triangle", "green", "bottom right"), ("star", "yellow", "top")],
        ),
        ("a circle at the top", [("circle", None, "top")]),
        ("a red circle", [("circle", "red", None)]),
        ("a red blue circle on the left", [("circle", None, "left")]),
        ("a red circle at the top left bottom", [("circle", "red", None)]),
        (
            "a red circle on the left and at the bottom",
            [("circle", "red", "left"), (None, None, "bottom")],
        ),
        ("a noisy background", []),
    ],
)
def test_parse_caption_examples(caption, triples):
    assert demo_captions.parse_caption(caption) == triples


def test_wrong_captions_are_rejected(root):
    objects = _all_objects(root)
    objs = next(o for o in objects.values() if len(o) >= 2)
    assert demo_captions.caption_correct(_simple_caption(objs), objs)
    first = objs[0]
    free = next(p for p in demo_scenes.POSITIONS if p not in {o["position"] for o in objs})
    other_colour = next(c for c in demo_scenes.COLOURS if c != first["colour"])
    wrong = {
        "colour": [{**first, "colour": other_colour}, *objs[1:]],
        "position": [{**first, "position": free}, *objs[1:]],
        "kind": [
            {**first, "kind": next(k for k in demo_scenes.KINDS if k != first["kind"])},
            *objs[1:],
        ],
        "dropped": objs[1:],
        "added": [*objs, {**first, "position": free}],
        "doubled": [*objs, first],
    }
    for name, variant in wrong.items():
        assert not demo_captions.caption_correct(_simple_caption(variant), objs), name
    # A real generated caption with one colour word changed is wrong too.
    colour_word = re.compile(
        r"\b("
        + "|".join(demo_captions.COLOUR_WORDS["red"] + demo_captions.COLOUR_WORDS["blue"])
        + r")\b"
    )
    checked = 0
    for split in SPLITS:
        for ann in _load(root, "captions", split)["annotations"]:
            if colour_word.search(ann["caption"]):
                swapped = colour_word.sub(
                    lambda m: "blue" if m[1] == "red" else "red", ann["caption"], count=1
                )
                assert not demo_captions.caption_correct(swapped, objects[ann["image_id"]]), swapped
                checked += 1
    assert checked > 0
