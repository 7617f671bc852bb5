"""Read a folder in the COCO 2014 captions layout into the caption table.

Every data source ends as `<root>/{train2014,val2014}/` image folders plus
`<root>/annotations/captions_{train,val}2014.json` (see docs/design.md). This
module parses those annotation files strictly (a broken file is named together
with what is wrong in it), decides which split each image belongs to (COCO:
train2014 -> train, val2014 divided by a seeded permutation into val/test; or
the Karpathy split from `<root>/splits.json`), applies the per-split caps and
returns one row per caption. Annotations whose image file is absent are dropped
and reported in a stats dict, never silently. Decoding the pixels is the job of
`captioning.data.validation`. For the writers of the layout (demo, coco, flickr),
`prune_image_folder` keeps an image folder to exactly the images they list.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from captioning.atomic_files import is_temporary
from captioning.config import SplitParams

SPLITS = ("train", "val", "test")
# Annotation file and image folder of each COCO 2014 release, in reading order.
RELEASES = (("train2014", "captions_train2014.json"), ("val2014", "captions_val2014.json"))
TABLE_COLUMNS = ["image_id", "file_name", "path", "split", "caption", "width", "height"]
KARPATHY_FILE = "splits.json"
# Karpathy's "restval" images are the val2014 images outside his val/test; everyone trains on them.
_KARPATHY_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


class AnnotationError(ValueError):
    """An annotation or splits file is unreadable or does not follow the COCO schema."""


def _is_int(value: Any) -> bool:
    # JSON true/false decode to bool, an int subclass; an id of `true` is a broken file.
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _records(path: Path, data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    if key not in data:
        raise AnnotationError(f"{path}: missing top-level key '{key}' (found {sorted(data)})")
    records = data[key]
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: '{key}' must be a list, got {_type_name(records)}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise AnnotationError(f"{path}: {key}[{i}] must be an object, got {_type_name(record)}")
    return records


def _is_positive(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_caption(value: Any) -> bool:
    # A null caption is bad data, not a broken file: validate drops and counts it.
    return value is None or isinstance(value, str)


# (field, check, what it must be, required) for each record kind of the schema.
_IMAGE_FIELDS = (
    ("id", _is_int, "an integer", True),
    ("file_name", _is_name, "a non-empty string", True),
    ("width", _is_positive, "a positive integer", False),
    ("height", _is_positive, "a positive integer", False),
)
_ANNOTATION_FIELDS = (
    ("image_id", _is_int, "an integer", True),
    ("caption", _is_caption, "a string", True),
)


def _check_records(path: Path, key: str, records: list[dict[str, Any]], fields) -> None:
    for i, record in enumerate(records):
        for field, check, expected, required in fields:
            if field not in record:
                if required:
                    keys = sorted(record)
                    raise AnnotationError(f"{path}: {key}[{i}] has no '{field}' (keys: {keys})")
                continue
            value = record[field]
            if not check(value):
                raise AnnotationError(
                    f"{path}: {key}[{i}].{field} must be {expected}, "
                    f"got {_type_name(value)} {value!r:.60}"
                )


def read_annotations(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parse a COCO captions JSON into `(images, captions)` frames.

    images: image_id int64, file_name str, width/height Int64 (nullable: optional in
    the schema). captions: image_id int64, caption str or None, in file order.
    Raises AnnotationError naming the file and the first problem found.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err})") from err
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be an object, got {_type_name(data)}")

    images = _records(path, data, "images")
    annotations = _records(path, data, "annotations")
    _check_records(path, "images", images, _IMAGE_FIELDS)
    _check_records(path, "annotations", annotations, _ANNOTATION_FIELDS)

    image_frame = pd.DataFrame(
        {
            "image_id": pd.array([r["id"] for r in images], dtype="int64"),
            "file_name": pd.array([r["file_name"] for r in images], dtype=object),
            "width": pd.array([r.get("width") for r in images], dtype="Int64"),
            "height": pd.array([r.get("height") for r in images], dtype="Int64"),
        }
    )
    duplicated = image_frame["image_id"].duplicated()
    if duplicated.any():
        dup_ids = image_frame.loc[duplicated, "image_id"].head(5).tolist()
        raise AnnotationError(f"{path}: image ids listed more than once in 'images': {dup_ids}")
    caption_frame = pd.DataFrame(
        {
            "image_id": pd.array([r["image_id"] for r in annotations], dtype="int64"),
            "caption": pd.array([r["caption"] for r in annotations], dtype=object),
        }
    )
    return image_frame, caption_frame


def read_karpathy_splits(path: str | Path) -> dict[int, str]:
    """Read `splits.json` ({image_id: train|restval|val|test}) as {image_id: split}."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise AnnotationError(
            f"{path}: expected an object image_id -> split, got {_type_name(raw)}"
        )
    return _normalise_karpathy(raw, str(path))


def _normalise_karpathy(raw: Mapping[Any, Any], source: str) -> dict[int, str]:
    splits: dict[int, str] = {}
    for key, value in raw.items():
        try:
            # JSON object keys are strings; accept "123" as well as 123 from a Python dict.
            image_id = int(key) if not isinstance(key, bool) else None
        except (TypeError, ValueError):
            image_id = None
        if image_id is None:
            raise AnnotationError(f"{source}: key {key!r} is not an integer image id")
        if value not in _KARPATHY_NAMES:
            raise AnnotationError(
                f"{source}: image {key}: split {value!r} is not one of {sorted(_KARPATHY_NAMES)}"
            )
        splits[image_id] = _KARPATHY_NAMES[value]
    return splits


def seeded_order(image_ids, seed: int) -> np.ndarray:
    """Image ids in the seeded order every split decision uses (independent of input order)."""
    ids = np.sort(np.asarray(image_ids, dtype=np.int64))
    return np.random.default_rng(seed).permutation(ids)


def _ranked(order: np.ndarray, name: str) -> pd.DataFrame:
    return pd.DataFrame({"image_id": order, "split": name, "rank": np.arange(len(order))})


def assign_splits(
    train_ids, val_ids, split: SplitParams, karpathy_splits: Mapping[Any, str] | None = None
) -> pd.DataFrame:
    """Decide each image's split: columns image_id, split, rank (position in the seeded order).

    COCO scheme: train2014 -> train; of the seeded order of val2014 ids, the first
    `val_fraction * n` (rounded half up) -> val, the rest -> test. Karpathy scheme:
    the mapping decides, restval counts as train, unmapped images get no row.
    """
    if split.scheme == "karpathy":
        if karpathy_splits is None:
            raise ValueError("split.scheme is 'karpathy' but no Karpathy splits were given")
        mapping = _normalise_karpathy(karpathy_splits, "karpathy splits")
        known = np.union1d(np.asarray(train_ids, np.int64), np.asarray(val_ids, np.int64))
        frames = [
            _ranked(
                seeded_order([i for i in known.tolist() if mapping.get(i) == name], split.seed),
                name,
            )
            for name in SPLITS
        ]
        return pd.concat(frames, ignore_index=True)

    if not 0.0 <= split.val_fraction <= 1.0:
        raise ValueError(f"split.val_fraction={split.val_fraction} must be within [0, 1]")
    val_order = seeded_order(val_ids, split.seed)
    n_val = math.floor(split.val_fraction * len(val_order) + 0.5)
    frames = [
        _ranked(seeded_order(train_ids, split.seed), "train"),
        _ranked(val_order[:n_val], "val"),
        _ranked(val_order[n_val:], "test"),
    ]
    return pd.concat(frames, ignore_index=True)


def apply_caps(images: pd.DataFrame, split: SplitParams) -> pd.DataFrame:
    """Keep the first `max_<split>_images` of each split by seeded rank (None keeps all)."""
    caps = {
        "train": split.max_train_images,
        "val": split.max_val_images,
        "test": split.max_test_images,
    }
    keep = pd.Series(True, index=images.index)
    for name, cap in caps.items():
        if cap is None:
            continue
        if cap < 0:
            raise ValueError(f"split.max_{name}_images={cap} must be >= 0")
        in_split = images["split"] == name
        # Rank among the images still present, so missing files do not shrink the cap.
        position = images.loc[in_split, "rank"].rank(method="first") - 1
        keep.loc[position.index] = position < cap
    return images[keep]


def caption_table(
    root: str | Path, split: SplitParams, karpathy_splits: Mapping[Any, str] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The caption table of a COCO-layout folder, and what was dropped building it.

    Returns `(table, stats)`: table has the columns of docs/design.md, one row per
    caption, sorted by split, seeded rank, then the captions' file order (width and
    height are the annotation's, nullable Int64, until `captioning.data.validation.check_images`
    records the decoded size). stats counts images per split and what was dropped:
    missing image files, captions of images absent from 'images', images without
    captions or without a split. Splits are decided on all annotated images before
    missing files are dropped, so a lost file never moves another image to another split.
    """
    root = Path(root)
    images, captions = _read_releases(root)
    folder_ids = {
        folder: images.loc[images["folder"] == folder, "image_id"].to_numpy()
        for folder, _ in RELEASES
    }
    karpathy_splits = _karpathy_splits(root, split, karpathy_splits)
    assigned = assign_splits(folder_ids["train2014"], folder_ids["val2014"], split, karpathy_splits)
    stats: dict[str, Any] = {
        "annotated_images": int(len(images)),
        "captions_in_files": int(len(captions)),
    }
    images, captions = _keep_usable(root, images, captions, assigned, stats)
    images = apply_caps(images, split)
    stats["images"] = {name: int((images["split"] == name).sum()) for name in SPLITS}

    captions = captions.reset_index(drop=True)
    captions["order"] = np.arange(len(captions))
    table = images.merge(captions, on="image_id", how="inner")
    table["split_order"] = table["split"].map({name: i for i, name in enumerate(SPLITS)})
    table = table.sort_values(["split_order", "rank", "order"], kind="stable")
    table = table[TABLE_COLUMNS].reset_index(drop=True)
    stats["captions"] = int(len(table))
    return table, stats


def _read_releases(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(images with their folder, captions) of both releases; an id in both is an error."""
    images_parts, captions_parts = [], []
    for folder, name in RELEASES:
        ann_path = root / "annotations" / name
        if not ann_path.is_file():
            raise FileNotFoundError(
                f"{ann_path}: annotation file missing (COCO 2014 layout, docs/design.md)"
            )
        images, captions = read_annotations(ann_path)
        images["folder"] = folder
        images_parts.append(images)
        captions_parts.append(captions)
    images = pd.concat(images_parts, ignore_index=True)
    captions = pd.concat(captions_parts, ignore_index=True)
    clash = images["image_id"].duplicated()
    if clash.any():
        raise AnnotationError(
            f"{root}/annotations: image ids in both train2014 and val2014: "
            f"{images.loc[clash, 'image_id'].head(5).tolist()}"
        )
    return images, captions


def _karpathy_splits(
    root: Path, split: SplitParams, given: Mapping[Any, str] | None
) -> Mapping[Any, str] | None:
    """The Karpathy split to use: `given`, else `<root>/splits.json` when the scheme asks."""
    if split.scheme == "coco" and given is not None:
        raise ValueError(
            "karpathy_splits given but split.scheme is 'coco'; set split.scheme: karpathy"
        )
    if split.scheme == "karpathy" and given is None:
        splits_path = root / KARPATHY_FILE
        if not splits_path.is_file():
            raise FileNotFoundError(
                f"{splits_path}: split.scheme is 'karpathy' but the file is missing"
            )
        return read_karpathy_splits(splits_path)
    return given


def _keep_usable(
    root: Path,
    images: pd.DataFrame,
    captions: pd.DataFrame,
    assigned: pd.DataFrame,
    stats: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Images with captions, a split and a file on disk (with their path), and their captions.

    Counts what it drops into `stats`.
    """
    orphan = ~captions["image_id"].isin(images["image_id"])
    stats["captions_without_image_entry"] = int(orphan.sum())
    captions = captions[~orphan]
    stats["images_without_captions"] = int((~images["image_id"].isin(captions["image_id"])).sum())
    images = images[images["image_id"].isin(captions["image_id"])]
    unassigned = ~images["image_id"].isin(assigned["image_id"])
    stats["images_without_split"] = int(unassigned.sum())
    images = images.merge(assigned, on="image_id", how="inner")

    images["path"] = [
        (root / folder / file_name).as_posix()
        for folder, file_name in zip(images["folder"], images["file_name"], strict=True)
    ]
    present = np.array([Path(p).is_file() for p in images["path"]], dtype=bool)
    missing = images[~present]
    stats["missing_image_files"] = int(len(missing))
    stats["missing_image_captions"] = int(captions["image_id"].isin(missing["image_id"]).sum())
    stats["missing_image_examples"] = sorted(missing["file_name"].tolist())[:20]
    return images[present], captions


def prune_image_folder(folder: Path, keep: set[str]) -> None:
    """Delete `folder`'s COCO-named files not in `keep`, and temporary files of killed writes.

    Images of an earlier, different run would otherwise linger in the layout (and
    in DVC's hash of it) without a caption file listing them.
    """
    prefix = f"COCO_{folder.name}_"
    for path in folder.iterdir():
        stale = path.name.startswith(prefix) and path.name not in keep
        if (stale or is_temporary(path)) and path.is_file():
            path.unlink()
