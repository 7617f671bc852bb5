"""Tests for captioning.data.coco_layout: strict annotation parsing, split rules, caps, stats.

Each test writes a small folder in the COCO 2014 layout under tmp_path. Only
file presence matters here (pixels are validate's business), so most image
files are a few bytes; `test_validate.py` covers decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from captioning.atomic_files import temporary_sibling
from captioning.config import SplitParams, from_dict
from captioning.data.coco_layout import (
    TABLE_COLUMNS,
    AnnotationError,
    apply_caps,
    assign_splits,
    caption_table,
    prune_image_folder,
    read_annotations,
)

TRAIN_IDS = list(range(1, 11))
VAL_IDS = list(range(100, 120))


def file_name(folder: str, image_id: int) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg"


def write_layout(
    root: Path,
    train_ids=TRAIN_IDS,
    val_ids=VAL_IDS,
    missing=(),
    captions_per_image=2,
    shuffle=False,
) -> Path:
    """A COCO-layout folder; ids in `missing` are annotated but have no file."""
    for folder, ids in (("train2014", train_ids), ("val2014", val_ids)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in ids:
            name = file_name(folder, image_id)
            images.append({"id": image_id, "file_name": name, "width": 8, "height": 6})
            for k in range(captions_per_image):
                annotations.append(
                    {"image_id": image_id, "id": image_id * 10 + k, "caption": f"c{image_id} {k}"}
                )
            if image_id not in missing:
                (root / folder / name).write_bytes(b"x")
        if shuffle:
            images.reverse()
            annotations.reverse()
        write_json(
            root / "annotations" / f"captions_{folder}.json",
            {"images": images, "annotations": annotations},
        )
    return root


def write_json(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def images_by_split(table: pd.DataFrame) -> dict[str, list[int]]:
    per_image = table.drop_duplicates("image_id")
    return {
        s: per_image.loc[per_image["split"] == s, "image_id"].tolist()
        for s in ("train", "val", "test")
    }


# ---------------------------------------------------------------- read_annotations


def test_read_annotations_frames(tmp_path):
    path = write_json(
        tmp_path / "caps.json",
        {
            "images": [
                {"id": 5, "file_name": "a.jpg", "width": 4, "height": 3},
                {"id": 7, "file_name": "b.jpg"},
            ],
            "annotations": [
                {"image_id": 5, "id": 1, "caption": "x y"},
                {"image_id": 7, "id": 2, "caption": None},
            ],
        },
    )
    images, captions = read_annotations(path)
    assert images["image_id"].tolist() == [5, 7]
    assert str(images["image_id"].dtype) == "int64"
    assert images["width"].tolist()[0] == 4 and pd.isna(images["width"].iloc[1])
    assert captions["caption"].tolist() == ["x y", None]


BROKEN = {
    "bad_json": ('{"images": [', "not valid JSON"),
    "top_level_list": ("[]", "top level must be an object"),
    "no_images": ('{"annotations": []}', "missing top-level key 'images'"),
    "annotations_not_list": ('{"images": [], "annotations": {}}', "'annotations' must be a list"),
    "image_not_object": ('{"images": [3], "annotations": []}', "images[0] must be an object"),
    "image_without_id": (
        '{"images": [{"file_name": "a.jpg"}], "annotations": []}',
        "images[0] has no 'id'",
    ),
    "string_id": (
        '{"images": [{"id": "12", "file_name": "a.jpg"}], "annotations": []}',
        "images[0].id must be an integer, got str",
    ),
    "bool_id": (
        '{"images": [{"id": true, "file_name": "a.jpg"}], "annotations": []}',
        "images[0].id must be an integer, got bool",
    ),
    "empty_file_name": (
        '{"images": [{"id": 1, "file_name": ""}], "annotations": []}',
        "images[0].file_name must be a non-empty string",
    ),
    "negative_width": (
        '{"images": [{"id": 1, "file_name": "a", "width": -4}], "annotations": []}',
        "images[0].width must be a positive integer",
    ),
    "caption_number": (
        '{"images": [], "annotations": [{"image_id": 1, "caption": 3}]}',
        "annotations[0].caption must be a string, got int",
    ),
    "annotation_without_image_id": (
        '{"images": [], "annotations": [{"caption": "x"}]}',
        "annotations[0] has no 'image_id'",
    ),
    "duplicate_image_id": (
        '{"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}], "annotations": []}',
        "listed more than once",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_annotation_files_name_file_and_problem(tmp_path, case):
    text, problem = BROKEN[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError) as err:
        read_annotations(path)
    assert str(path) in str(err.value)
    assert problem in str(err.value)


def test_non_utf8_annotation_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"images": [], "annotations": [{"caption": "caf\xe9"}]}'.encode("latin-1"))
    with pytest.raises(AnnotationError, match="not UTF-8"):
        read_annotations(path)


def test_missing_annotation_file_is_named(tmp_path):
    root = write_layout(tmp_path)
    (root / "annotations" / "captions_train2014.json").unlink()
    with pytest.raises(FileNotFoundError, match="captions_train2014.json"):
        caption_table(root, SplitParams())


def test_image_in_both_releases_is_rejected(tmp_path):
    root = write_layout(tmp_path, train_ids=[1, 2], val_ids=[2, 3])
    with pytest.raises(AnnotationError, match=r"both train2014 and val2014: \[2\]"):
        caption_table(root, SplitParams())


# ---------------------------------------------------------------- caption_table (COCO scheme)


def test_caption_table_contract(tmp_path):
    root = write_layout(tmp_path)
    table, stats = caption_table(root, SplitParams())
    assert list(table.columns) == TABLE_COLUMNS
    assert str(table["image_id"].dtype) == "int64"
    assert len(table) == 2 * (len(TRAIN_IDS) + len(VAL_IDS)) == stats["captions"]
    row = table[table["image_id"] == 3].iloc[0]
    assert row["path"] == (root / "train2014" / file_name("train2014", 3)).as_posix()
    assert row["split"] == "train" and row["width"] == 8
    # captions keep their file order within an image
    assert table[table["image_id"] == 3]["caption"].tolist() == ["c3 0", "c3 1"]


def test_coco_split_rules_are_seeded_disjoint_and_complete(tmp_path):
    root = write_layout(tmp_path)
    table, stats = caption_table(root, SplitParams(seed=7, val_fraction=0.25))
    splits = images_by_split(table)
    assert sorted(splits["train"]) == TRAIN_IDS
    assert len(splits["val"]) == 5 and len(splits["test"]) == 15
    assert sorted(splits["val"] + splits["test"]) == VAL_IDS
    assert stats["images"] == {"train": 10, "val": 5, "test": 15}
    assert table.groupby("image_id")["split"].nunique().max() == 1

    again, _ = caption_table(root, SplitParams(seed=7, val_fraction=0.25))
    pd.testing.assert_frame_equal(table, again)
    other, _ = caption_table(root, SplitParams(seed=8, val_fraction=0.25))
    assert set(images_by_split(other)["val"]) != set(splits["val"])


def test_split_does_not_depend_on_file_order(tmp_path):
    plain, _ = caption_table(write_layout(tmp_path / "a"), SplitParams())
    shuffled, _ = caption_table(write_layout(tmp_path / "b", shuffle=True), SplitParams())
    assert images_by_split(plain) == images_by_split(shuffled)


def test_caps_keep_a_prefix_of_the_seeded_order(tmp_path):
    root = write_layout(tmp_path)
    full, _ = caption_table(root, SplitParams())
    capped, stats = caption_table(
        root, SplitParams(max_train_images=3, max_val_images=2, max_test_images=100)
    )
    full_splits, capped_splits = images_by_split(full), images_by_split(capped)
    assert capped_splits["train"] == full_splits["train"][:3]
    assert capped_splits["val"] == full_splits["val"][:2]
    assert capped_splits["test"] == full_splits["test"]
    assert stats["images"] == {"train": 3, "val": 2, "test": 10}


def test_caps_of_zero_and_negative(tmp_path):
    root = write_layout(tmp_path)
    table, _ = caption_table(root, SplitParams(max_train_images=0))
    assert "train" not in set(table["split"])
    with pytest.raises(ValueError, match="max_val_images=-1"):
        caption_table(root, SplitParams(max_val_images=-1))


def test_apply_caps_counts_only_present_images():
    images = pd.DataFrame({"image_id": [1, 2, 3], "split": "train", "rank": [0, 2, 5]})
    assert apply_caps(images, SplitParams(max_train_images=2))["image_id"].tolist() == [1, 2]


def test_missing_image_files_are_dropped_counted_and_do_not_move_others(tmp_path):
    complete, _ = caption_table(write_layout(tmp_path / "a"), SplitParams())
    root = write_layout(tmp_path / "b", missing={2, 105})
    table, stats = caption_table(root, SplitParams())
    assert stats["missing_image_files"] == 2
    assert stats["missing_image_captions"] == 4
    assert stats["missing_image_examples"] == [
        file_name("train2014", 2),
        file_name("val2014", 105),
    ]
    assert not {2, 105} & set(table["image_id"])
    expected = complete[~complete["image_id"].isin([2, 105])].reset_index(drop=True)
    expected["path"] = expected["path"].str.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    pd.testing.assert_frame_equal(table, expected)


def test_orphan_captions_and_captionless_images_are_counted(tmp_path):
    root = write_layout(tmp_path)
    path = root / "annotations" / "captions_val2014.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"image_id": 999, "id": 1, "caption": "no such image"})
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 101]
    path.write_text(json.dumps(data))
    table, stats = caption_table(root, SplitParams())
    assert stats["captions_without_image_entry"] == 1
    assert stats["images_without_captions"] == 1
    assert not {999, 101} & set(table["image_id"])


def test_val_fraction_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits([1], [2], SplitParams(val_fraction=1.5))


# ---------------------------------------------------------------- Karpathy scheme


def test_karpathy_splits_file(tmp_path):
    root = write_layout(tmp_path)
    mapping = {str(i): "train" for i in TRAIN_IDS}
    mapping |= {"100": "val", "101": "val", "102": "test", "103": "restval"}
    write_json(root / "splits.json", mapping)
    table, stats = caption_table(root, SplitParams(scheme="karpathy"))
    splits = images_by_split(table)
    assert sorted(splits["train"]) == TRAIN_IDS + [103]
    assert sorted(splits["val"]) == [100, 101] and splits["test"] == [102]
    assert stats["images_without_split"] == len(VAL_IDS) - 4

    # the COCO scheme ignores the file
    coco, _ = caption_table(root, SplitParams(scheme="coco"))
    assert sorted(images_by_split(coco)["train"]) == TRAIN_IDS


def test_karpathy_mapping_argument_and_errors(tmp_path):
    root = write_layout(tmp_path)
    table, _ = caption_table(root, SplitParams(scheme="karpathy"), {1: "test", 100: "train"})
    assert images_by_split(table) == {"train": [100], "val": [], "test": [1]}
    with pytest.raises(FileNotFoundError, match="splits.json"):
        caption_table(root, SplitParams(scheme="karpathy"))
    with pytest.raises(AnnotationError, match="'dev' is not one of"):
        caption_table(root, SplitParams(scheme="karpathy"), {1: "dev"})
    with pytest.raises(ValueError, match="scheme is 'coco'"):
        caption_table(root, SplitParams(), {1: "train"})
    write_json(root / "splits.json", {"abc": "train"})
    with pytest.raises(AnnotationError, match="'abc' is not an integer image id"):
        caption_table(root, SplitParams(scheme="karpathy"))


def test_scheme_is_a_checked_param():
    assert from_dict(SplitParams, "split", {"scheme": "karpathy"}).scheme == "karpathy"
    with pytest.raises(ValueError, match="allowed: one of"):
        from_dict(SplitParams, "split", {"scheme": "flickr"})


def test_prune_keeps_listed_images_and_drops_strays_and_temporary_files(tmp_path):
    folder = tmp_path / "val2014"
    folder.mkdir()
    listed, stale = file_name("val2014", 1), file_name("val2014", 2)
    for name in (listed, stale, "README.txt"):
        (folder / name).write_bytes(b"x")
    temporary_sibling(folder / listed).write_bytes(b"half")
    prune_image_folder(folder, {listed})
    assert sorted(p.name for p in folder.iterdir()) == sorted([listed, "README.txt"])
