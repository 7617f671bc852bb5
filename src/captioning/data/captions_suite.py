"""The Great Expectations suites that guard the caption table, in one reviewable place.

The `validate` stage checks the caption table (docs/design.md) as two frames:
`caption_rows` (one row per caption, plus a computed `n_words`) and `images`
(one row per distinct image record, plus `n_captions` and `n_splits`), because
"one record per image" and "one split per image" are statements about images,
not captions. Each expectation carries a severity: `critical` ones are hard
(the table would break a later stage, so the stage fails), `warning` ones are
soft (reported in reports/validation/, the stage goes on). Changing what the
pipeline accepts means editing `expectation_specs` below; great_expectations is
imported only when a suite is built, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pandas as pd

from captioning.config import ValidateParams

HARD = "critical"
SOFT = "warning"
SPLIT_NAMES = ["train", "val", "test"]
CAPTION_COLUMNS = [
    "image_id",
    "file_name",
    "path",
    "split",
    "caption",
    "width",
    "height",
    "n_words",
]
IMAGE_KEY = ["image_id", "file_name", "path", "split", "width", "height"]


class Check(NamedTuple):
    """One expectation: the frame it runs on, the GX class, its arguments, severity and reason."""

    frame: str
    expectation: str
    kwargs: dict[str, Any]
    severity: str
    why: str


def expectation_specs(params: ValidateParams) -> list[Check]:
    """Every expectation of the caption suites, with its severity and the reason it exists."""
    words = {"min_value": params.min_caption_words, "max_value": params.max_caption_words}
    # fmt: off
    return [
        # caption_rows: one row per caption
        Check("caption_rows", "ExpectTableRowCountToBeBetween", {"min_value": 1}, HARD,
              "later stages need at least one caption"),
        Check("caption_rows", "ExpectTableColumnsToMatchSet",
              {"column_set": CAPTION_COLUMNS, "exact_match": True}, HARD,
              "the caption table contract of docs/design.md (+ n_words, computed here)"),
        Check("caption_rows", "ExpectColumnValuesToBeOfType",
              {"column": "image_id", "type_": "int64"}, HARD,
              "image ids join features, tokens and predictions"),
        Check("caption_rows", "ExpectColumnValuesToNotBeNull", {"column": "path"}, HARD,
              "every caption's image is present on disk"),
        Check("caption_rows", "ExpectColumnValuesToNotBeNull", {"column": "caption"}, HARD,
              "null captions are dropped (and counted) before the suite"),
        Check("caption_rows", "ExpectColumnValuesToMatchRegex",
              {"column": "caption", "regex": r"\S"}, HARD,
              "whitespace-only captions are dropped (and counted) before the suite"),
        Check("caption_rows", "ExpectColumnValuesToBeInSet",
              {"column": "split", "value_set": SPLIT_NAMES}, HARD,
              "tokenize, train and evaluate select rows by these names"),
        Check("caption_rows", "ExpectColumnValuesToBeBetween", {"column": "n_words", **words}, SOFT,
              "odd lengths are worth a look; tokenize pads or cuts them anyway"),
        Check("caption_rows", "ExpectColumnDistinctValuesToContainSet",
              {"column": "split", "value_set": SPLIT_NAMES}, SOFT,
              "an empty split is legal (caps, val_fraction) but usually a mistake"),
        # images: one row per distinct (image_id, file_name, path, split, width, height)
        Check("images", "ExpectColumnValuesToBeUnique", {"column": "image_id"}, HARD,
              "an image id has one file, one size and one split across all its captions"),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "n_splits", "min_value": 1, "max_value": 1}, HARD,
              "splits are disjoint: no image in two of train/val/test"),
        Check("images", "ExpectColumnValuesToBeOfType",
              {"column": "width", "type_": "int64"}, HARD,
              "width is the decoded size, recorded by check_images"),
        Check("images", "ExpectColumnValuesToBeOfType",
              {"column": "height", "type_": "int64"}, HARD,
              "height is the decoded size, recorded by check_images"),
        Check("images", "ExpectColumnValuesToBeBetween", {"column": "width", "min_value": 1}, HARD,
              "a decoded image has pixels"),
        Check("images", "ExpectColumnValuesToBeBetween", {"column": "height", "min_value": 1}, HARD,
              "a decoded image has pixels"),
        Check("images", "ExpectColumnValuesToBeUnique", {"column": "path"}, SOFT,
              "two ids sharing one file duplicate features and leak across splits"),
    ]
    # fmt: on


def build_suites(params: ValidateParams) -> dict[str, list[Any]]:
    """GX Expectation objects per frame name, each carrying its severity and reason in meta."""
    import great_expectations.expectations as gxe

    suites: dict[str, list[Any]] = {}
    for check in expectation_specs(params):
        cls = getattr(gxe, check.expectation)
        expectation = cls(**check.kwargs, severity=check.severity, meta={"why": check.why})
        suites.setdefault(check.frame, []).append(expectation)
    return suites


def suite_frames(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The frames the suites run on, derived from a caption table.

    Both have a RangeIndex, so GX's unexpected row numbers point into them.
    """
    captions = table.reset_index(drop=True).copy()
    # A plain loop is ~5x faster than .str.split().str.len() on COCO's 400k captions.
    n_words = [len(c.split()) if isinstance(c, str) else 0 for c in captions["caption"]]
    captions["n_words"] = pd.array(n_words, dtype="int64")
    images = captions.drop_duplicates(IMAGE_KEY)[IMAGE_KEY].reset_index(drop=True)
    per_image = captions.groupby("image_id")
    images["n_captions"] = images["image_id"].map(per_image.size()).astype("int64")
    images["n_splits"] = images["image_id"].map(per_image["split"].nunique()).astype("int64")
    return {"caption_rows": captions, "images": images}
