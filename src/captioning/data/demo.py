"""The embedded demo data set: seeded synthetic scenes of shapes, written in the COCO 2014 layout.

`generate_demo` draws every image's scene (`captioning.data.demo_scenes`),
words it five ways (`captioning.data.demo_captions`), and writes the images,
the caption and instance files and a marker naming the parameters, so the
pipeline runs end to end without a download. The same seed gives
byte-identical files; a folder that already holds the requested data set is
left untouched, and one left half-written by a killed run is completed into
exactly what a fresh run writes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from captioning.atomic_files import atomic_write, is_temporary
from captioning.data import demo_scenes
from captioning.data.coco_layout import prune_image_folder
from captioning.data.demo_captions import CAPTIONS_PER_IMAGE, describe

MARKER_NAME = "demo_params.json"
# Bump when the generator's output changes, so an old folder is not mistaken for current.
GENERATOR_VERSION = 5
SPLITS = ("train", "val")
_CATEGORY_IDS = {kind: i + 1 for i, kind in enumerate(demo_scenes.KINDS)}


class _Scene(NamedTuple):
    """One written image: its COCO image record, its captions and the objects it shows."""

    image: dict[str, Any]
    captions: list[str]
    objects: list[dict]


def generate_demo(root: str | Path, n_train: int, n_val: int, seed: int) -> dict:
    """Write the demo data set under root in the COCO 2014 layout; a no-op when already there."""
    _check_arguments(n_train=n_train, n_val=n_val, seed=seed)
    root = Path(root)
    marker = _marker(n_train, n_val, seed)
    if _is_complete(root, marker):
        return marker["summary"]
    split_ids = _image_ids(n_train, n_val, seed)
    _start_over(root, split_ids)
    caption_ids, instance_ids = itertools.count(1), itertools.count(1)  # unique across splits
    for split, image_ids in split_ids.items():
        scenes = [_write_image(root, split, image_id, seed) for image_id in image_ids]
        # Annotations after images, marker last: a half-written folder is never taken as done.
        _write_annotations(root, split, seed, scenes, caption_ids, instance_ids)
    atomic_write(root / MARKER_NAME, json.dumps(marker, indent=2))
    return marker["summary"]


def _check_arguments(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _marker(n_train: int, n_val: int, seed: int) -> dict[str, Any]:
    """What the marker file holds once the folder is complete; it includes the summary returned."""
    return {
        "generator": "captioning.data.demo",
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "summary": {
            "train_images": n_train,
            "val_images": n_val,
            "captions": CAPTIONS_PER_IMAGE * (n_train + n_val),
        },
    }


def _image_ids(n_train: int, n_val: int, seed: int) -> dict[str, list[int]]:
    """split -> sorted image ids, drawn at random as in COCO so nothing can lean on them being 1..n."""
    ids = np.random.default_rng(seed).choice(999_999, size=n_train + n_val, replace=False) + 1
    return {
        "train": sorted(int(i) for i in ids[:n_train]),
        "val": sorted(int(i) for i in ids[n_train:]),
    }


def _file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def _is_complete(root: Path, marker: dict) -> bool:
    """The marker matches and every annotation file and image it lists is present."""
    try:
        if json.loads((root / MARKER_NAME).read_text(encoding="utf-8")) != marker:
            return False
        for split in SPLITS:
            if not (root / "annotations" / f"instances_{split}2014.json").is_file():
                return False
            captions = json.loads(
                (root / "annotations" / f"captions_{split}2014.json").read_text(encoding="utf-8")
            )
            if not all(
                (root / f"{split}2014" / i["file_name"]).is_file() for i in captions["images"]
            ):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _start_over(root: Path, split_ids: dict[str, list[int]]) -> None:
    """Make the folders and drop the marker, temporary files and images of a different run.

    Without the marker an interrupted run cannot look complete; without the
    strays a rerun writes exactly what a fresh run writes.
    """
    (root / MARKER_NAME).unlink(missing_ok=True)
    for folder in ("train2014", "val2014", "annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in split_ids.items():
        prune_image_folder(root / f"{split}2014", {_file_name(split, i) for i in ids})
    for path in [*root.iterdir(), *(root / "annotations").iterdir()]:
        if is_temporary(path) and path.is_file():
            path.unlink()


def _write_image(root: Path, split: str, image_id: int, seed: int) -> _Scene:
    """Draw, save and word one scene."""
    # Each image has its own stream, so it does not depend on its neighbours.
    rng = np.random.default_rng([seed, image_id])
    objects = demo_scenes.sample_objects(rng)
    file_name = _file_name(split, image_id)
    pixels = demo_scenes.render_scene(objects, rng)
    atomic_write(root / f"{split}2014" / file_name, demo_scenes.jpeg_bytes(pixels))
    month, day, hour, minute, sec = (
        int(rng.integers(lo, hi)) for lo, hi in ((1, 13), (1, 29), (0, 24), (0, 60), (0, 60))
    )
    image = {
        "id": image_id,
        "file_name": file_name,
        "width": demo_scenes.IMAGE_SIZE,
        "height": demo_scenes.IMAGE_SIZE,
        "license": 1,
        "flickr_url": "",
        "coco_url": f"http://images.cocodataset.org/{split}2014/{file_name}",
        "date_captured": f"2013-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{sec:02d}",
    }
    return _Scene(image, describe(objects, rng), objects)


def _header(split: str, seed: int) -> dict[str, Any]:
    return {
        "info": {
            "description": f"Captioning demo data set ({split}, seed {seed}): synthetic shapes",
            "url": "",
            "version": str(GENERATOR_VERSION),
            "year": 2014,
            "contributor": "captioning.data.demo",
            "date_created": "2014-01-01 00:00:00",
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0 1.0 (generated data)",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
    }


def _instance(image_id: int, obj: dict, instance_id: int) -> dict[str, Any]:
    """One object as a COCO instance annotation, its demo attributes alongside."""
    return {
        "id": instance_id,
        "image_id": image_id,
        "category_id": _CATEGORY_IDS[obj["kind"]],
        "bbox": obj["bbox"],
        "area": round(demo_scenes.polygon_area(obj["points"]), 2),
        "iscrowd": 0,
        "segmentation": [[round(float(v), 2) for v in obj["points"].reshape(-1)]],
        "attributes": {k: obj[k] for k in ("colour", "size", "position")},
    }


def _write_annotations(
    root: Path,
    split: str,
    seed: int,
    scenes: list[_Scene],
    caption_ids: Iterator[int],
    instance_ids: Iterator[int],
) -> None:
    """Write the split's instances and captions files; ids continue from the given counters."""
    images = [scene.image for scene in scenes]
    captions = {
        **_header(split, seed),
        "images": images,
        "annotations": [
            {"id": next(caption_ids), "image_id": scene.image["id"], "caption": text}
            for scene in scenes
            for text in scene.captions
        ],
    }
    instances = {
        **_header(split, seed),
        "images": images,
        "annotations": [
            _instance(scene.image["id"], obj, next(instance_ids))
            for scene in scenes
            for obj in scene.objects
        ],
        "categories": [
            {"id": _CATEGORY_IDS[k], "name": k, "supercategory": "shape"} for k in demo_scenes.KINDS
        ],
    }
    for name, content in (("instances", instances), ("captions", captions)):
        atomic_write(root / "annotations" / f"{name}_{split}2014.json", json.dumps(content))
