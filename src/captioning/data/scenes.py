"""The scenes data set (`data.source: scenes`): a second generated set in the COCO 2014 layout.

The demo (`captioning.data.demo`) is what the defaults were tuned on; this set
exists to check that a choice carries to data the project was not tuned on
(docs/experiments.md, "Selection across data sets"). Its pictures, objects,
layout and caption grammar all differ from the demo's (`scenes_drawing`,
`scenes_captions`); what it shares is the file layout, so every stage reads
it unchanged. `generate_scenes` takes the same sizes and seed as the demo
(`data.demo_train_images`, `data.demo_val_images`, `data.seed`), gives
byte-identical files for a seed, leaves a complete folder untouched and
completes a half-written one into what a fresh run writes. `load_groups`
reads each image's groups back from the instances file, for the scorer.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from captioning.atomic_files import atomic_write, is_temporary
from captioning.data import scenes_drawing
from captioning.data.coco_layout import prune_image_folder
from captioning.data.scenes_captions import CAPTIONS_PER_IMAGE, describe

MARKER_NAME = "scenes_params.json"
# Bump when the generator's output changes, so an old folder is not mistaken for current.
GENERATOR_VERSION = 1
SPLITS = ("train", "val")
_CATEGORY_IDS = {kind: i + 1 for i, kind in enumerate(scenes_drawing.KINDS)}


def generate_scenes(root: str | Path, n_train: int, n_val: int, seed: int) -> dict:
    """Write the scenes data set under root in the COCO 2014 layout; a no-op when already there."""
    for name, value in (("n_train", n_train), ("n_val", n_val), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    root = Path(root)
    marker = {
        "generator": "captioning.data.scenes",
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
    if _is_complete(root, marker):
        return marker["summary"]
    # Drawn from another range than the demo's ids, so the two sets can never be confused.
    ids = np.random.default_rng([seed, 26]).choice(999_999, size=n_train + n_val, replace=False)
    split_ids = {"train": sorted(int(i) + 1 for i in ids[:n_train]),
                 "val": sorted(int(i) + 1 for i in ids[n_train:])}  # fmt: skip
    _start_over(root, split_ids)
    caption_ids, instance_ids = itertools.count(1), itertools.count(1)
    for split, image_ids in split_ids.items():
        records = [_write_image(root, split, image_id, seed) for image_id in image_ids]
        # Annotations after images, marker last: a half-written folder is never taken as done.
        _write_annotations(root, split, seed, records, caption_ids, instance_ids)
    atomic_write(root / MARKER_NAME, json.dumps(marker, indent=2))
    return marker["summary"]


def _file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def _is_complete(root: Path, marker: dict) -> bool:
    try:
        if json.loads((root / MARKER_NAME).read_text(encoding="utf-8")) != marker:
            return False
        for split in SPLITS:
            annotations = root / "annotations"
            if not (annotations / f"instances_{split}2014.json").is_file():
                return False
            captions = json.loads((annotations / f"captions_{split}2014.json").read_text())
            if not all((root / f"{split}2014" / i["file_name"]).is_file()
                       for i in captions["images"]):  # fmt: skip
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _start_over(root: Path, split_ids: dict[str, list[int]]) -> None:
    """Folders made; the marker, temporary files and other runs' images removed."""
    (root / MARKER_NAME).unlink(missing_ok=True)
    for folder in ("train2014", "val2014", "annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in split_ids.items():
        prune_image_folder(root / f"{split}2014", {_file_name(split, i) for i in ids})
    for path in [*root.iterdir(), *(root / "annotations").iterdir()]:
        if is_temporary(path) and path.is_file():
            path.unlink()


def _write_image(root: Path, split: str, image_id: int, seed: int) -> dict:
    """Draw, save and word one scene: {image, captions, scene}."""
    rng = np.random.default_rng([seed, 26, image_id])  # its own stream, whatever the neighbours
    scene = scenes_drawing.sample_scene(rng)
    file_name = _file_name(split, image_id)
    pixels = scenes_drawing.render_scene(scene, rng)
    atomic_write(root / f"{split}2014" / file_name, scenes_drawing.jpeg_bytes(pixels))
    day, hour, minute = (int(rng.integers(lo, hi)) for lo, hi in ((1, 29), (0, 24), (0, 60)))
    image = {
        "id": image_id,
        "file_name": file_name,
        "width": scenes_drawing.WIDTH,
        "height": scenes_drawing.HEIGHT,
        "license": 1,
        "flickr_url": "",
        "coco_url": "",
        "date_captured": f"2013-06-{day:02d} {hour:02d}:{minute:02d}:00",
    }
    return {"image": image, "captions": describe(scene, rng), "scene": scene}


def _header(split: str, seed: int) -> dict[str, Any]:
    return {
        "info": {
            "description": f"Captioning scenes data set ({split}, seed {seed}): groups of tokens",
            "url": "",
            "version": str(GENERATOR_VERSION),
            "year": 2014,
            "contributor": "captioning.data.scenes",
            "date_created": "2014-01-01 00:00:00",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0 (generated data)",
                      "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
    }  # fmt: skip


def _instance(image_id: int, obj: dict, count: int, instance_id: int) -> dict[str, Any]:
    outline = obj["polygons"][0]
    area = sum((-1 if n else 1) * scenes_drawing.polygon_area(p)
               for n, p in enumerate(obj["polygons"]))  # fmt: skip
    return {
        "id": instance_id,
        "image_id": image_id,
        "category_id": _CATEGORY_IDS[obj["kind"]],
        "bbox": obj["bbox"],
        "area": round(area, 2),
        "iscrowd": 0,
        # COCO polygons have no holes: a ring's segmentation is its outline.
        "segmentation": [[round(float(v), 2) for v in outline.reshape(-1)]],
        "attributes": {"colour": obj["colour"], "texture": obj["texture"],
                       "group": obj["group"], "count": count},
    }  # fmt: skip


def _write_annotations(root, split, seed, records, caption_ids, instance_ids) -> None:
    images = [r["image"] for r in records]
    captions = {
        **_header(split, seed),
        "images": images,
        "annotations": [{"id": next(caption_ids), "image_id": r["image"]["id"], "caption": text}
                        for r in records for text in r["captions"]],
    }  # fmt: skip
    instances = {
        **_header(split, seed),
        "images": images,
        "annotations": [
            _instance(r["image"]["id"], obj, r["scene"]["groups"][obj["group"]]["count"],
                      next(instance_ids))
            for r in records for obj in r["scene"]["objects"]
        ],
        "categories": [{"id": i, "name": k, "supercategory": "token"}
                       for k, i in _CATEGORY_IDS.items()],
    }  # fmt: skip
    for name, content in (("instances", instances), ("captions", captions)):
        atomic_write(root / "annotations" / f"{name}_{split}2014.json", json.dumps(content))


def load_groups(instances_json_path: str | Path) -> dict[int, list[dict]]:
    """image_id -> [{kind, colour, texture, count, boxes}] from a scenes instances file."""
    instances = json.loads(Path(instances_json_path).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in instances["categories"]}
    found: dict[int, dict[int, dict]] = {img["id"]: {} for img in instances["images"]}
    for ann in instances["annotations"]:
        a = ann["attributes"]
        group = found[ann["image_id"]].setdefault(a["group"], {
            "kind": names[ann["category_id"]], "colour": a["colour"],
            "texture": a["texture"], "count": a["count"], "boxes": [],
        })  # fmt: skip
        group["boxes"].append(list(ann["bbox"]))
    return {i: [groups[k] for k in sorted(groups)] for i, groups in found.items()}
