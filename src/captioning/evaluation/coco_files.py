"""COCO JSON files: a results file of candidate captions and a captions annotation file.

`load_results` reads `[{"image_id": int, "caption": str}, ...]` (one caption per
image, as coco-caption scores them) and `load_references` the "annotations" of a
COCO captions file, by image id; both say exactly which entry is malformed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captioning.evaluation.score_inputs import some_ids


def load_results(path: str | Path) -> dict[int, str]:
    """Read a COCO results file (`[{"image_id": int, "caption": str}, ...]`).

    Duplicate image ids are an error: pycocotools' `COCO.loadRes` keeps every
    entry and coco-caption then fails an assertion inside the scorers, so there
    is no official "first wins" or "last wins" to copy; we say which ids repeat.
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: a results file is a JSON list of "
            f'{{"image_id", "caption"}} objects, got {type(data).__name__}'
        )
    results: dict[int, str] = {}
    duplicates: dict[int, None] = {}  # an ordered set
    for k, entry in enumerate(data):
        image_id, caption = _caption_entry(entry, f"{path}: entry {k}")
        if image_id in results:
            duplicates[image_id] = None
        results[image_id] = caption
    if duplicates:
        raise ValueError(
            f"{path}: {len(duplicates)} image ids have more than one caption "
            f"(coco-caption scores exactly one per image): {some_ids(list(duplicates))}"
        )
    if not results:
        raise ValueError(f"{path}: the results file is empty")
    return results


def load_references(annotations_path: str | Path) -> dict[int, list[str]]:
    """Read the reference captions of a COCO captions annotation file, by image id."""
    data = _read_json(annotations_path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f'{annotations_path}: a COCO captions file is a JSON object with an "annotations" list'
        )
    references: dict[int, list[str]] = {}
    for k, entry in enumerate(data["annotations"]):
        image_id, caption = _caption_entry(entry, f"{annotations_path}: annotation {k}")
        references.setdefault(image_id, []).append(caption)
    if not references:
        raise ValueError(f"{annotations_path}: no caption annotations")
    return references


def _caption_entry(entry: Any, where: str) -> tuple[int, str]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is {type(entry).__name__}, not an object")
    image_id, caption = entry.get("image_id"), entry.get("caption")
    # bool is an int subclass; a float id (1.0) usually means a broken writer.
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise ValueError(f'{where}: "image_id" must be an integer, got {image_id!r}')
    if not isinstance(caption, str):
        raise ValueError(f'{where}: "caption" must be a string, got {caption!r}')
    return image_id, caption


def _read_json(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
