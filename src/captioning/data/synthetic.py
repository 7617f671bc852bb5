"""The generator both generated data sets write through: seeded pictures in the COCO 2014 layout.

A generated source (`captioning.data.demo`, `captioning.data.scenes`) is a
`SyntheticSource`: its name, its object kinds, and `draw`, which turns one
image's random stream into a picture, its captions and its objects. `generate`
does the rest alike for every source: draws the image ids, writes the images
to train2014/ and val2014/, the caption and instance files to annotations/ and
a marker naming the parameters. The same seed gives byte-identical files; a
folder that already holds the requested data set is left untouched, and one
left half-written by a killed run is completed into exactly what a fresh run
writes. The instance files carry each object's attributes beside the COCO
fields; `read_instances` reads them back, and `SyntheticSource.scorer` scores
captions against them (`captioning.data.scorers.TruthScorer`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from captioning.atomic_files import atomic_write, is_temporary
from captioning.data.coco_layout import prune_image_folder
from captioning.data.drawing import jpeg_bytes, polygon_area
from captioning.data.scorers import TruthRules, TruthScorer

SPLITS = ("train", "val")


class Instance(NamedTuple):
    """One object of a picture: polygons[0] is its outline, later ones are holes."""

    kind: str
    bbox: list[float]
    polygons: list[np.ndarray]
    attributes: dict[str, Any]  # the source's own truth (colour, position, ...), kept as is


class Drawn(NamedTuple):
    """What a source draws for one image from its random stream."""

    pixels: np.ndarray  # [H, W, 3] uint8
    date_captured: str
    captions: list[str]
    instances: list[Instance]


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """A generated data set: what it is called, what it draws, and how its captions are graded."""

    name: str  # `data.source`; the module is captioning.data.<name>
    version: int  # bump when the output changes, so an old folder is not mistaken for current
    subject: str  # what the pictures show, for the annotation files' description
    kinds: tuple[str, ...]  # object categories, ids 1, 2, ... in this order
    supercategory: str
    captions_per_image: int
    # Mixed into the seed of the id draw and of every image's stream, so sources
    # given the same seed draw different ids and pictures.
    stream: tuple[int, ...]
    coco_urls: bool  # image records name a cocodataset.org url, as COCO's own do
    draw: Callable[[np.random.Generator], Drawn]
    read_truth: Callable[[Path], dict[int, list[dict]]]  # an instances file -> truth per image
    rules: TruthRules

    @property
    def marker_name(self) -> str:
        return f"{self.name}_params.json"

    def scorer(self, root: Path) -> TruthScorer:
        """The source's scorer, from the truth of both splits' instance files under root."""
        truth: dict[int, list[dict]] = {}
        for split in SPLITS:
            truth.update(self.read_truth(root / "annotations" / f"instances_{split}2014.json"))
        return TruthScorer(truth, self.rules)


class _Written(NamedTuple):
    image: dict[str, Any]  # the COCO image record
    captions: list[str]
    instances: list[Instance]


def generate(
    source: SyntheticSource, root: str | Path, n_train: int, n_val: int, seed: int
) -> dict:
    """Write the source's data set under root in the COCO 2014 layout; a no-op when already there."""
    for name, value in (("n_train", n_train), ("n_val", n_val), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    root = Path(root)
    marker = _marker(source, n_train, n_val, seed)
    if _is_complete(root, source.marker_name, marker):
        return marker["summary"]
    split_ids = _image_ids(source, n_train, n_val, seed)
    _start_over(root, source.marker_name, split_ids)
    caption_ids, instance_ids = itertools.count(1), itertools.count(1)  # unique across splits
    for split, image_ids in split_ids.items():
        written = [_write_image(source, root, split, image_id, seed) for image_id in image_ids]
        # Annotations after images, marker last: a half-written folder is never taken as done.
        _write_annotations(source, root, split, seed, written, caption_ids, instance_ids)
    atomic_write(root / source.marker_name, json.dumps(marker, indent=2))
    return marker["summary"]


def _marker(source: SyntheticSource, n_train: int, n_val: int, seed: int) -> dict[str, Any]:
    """What the marker file holds once the folder is complete; it includes the summary returned."""
    return {
        "generator": f"captioning.data.{source.name}",
        "version": source.version,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "summary": {
            "train_images": n_train,
            "val_images": n_val,
            "captions": source.captions_per_image * (n_train + n_val),
        },
    }


def _image_ids(
    source: SyntheticSource, n_train: int, n_val: int, seed: int
) -> dict[str, list[int]]:
    """split -> sorted image ids, drawn at random as in COCO so nothing can lean on them being 1..n."""
    rng = np.random.default_rng([seed, *source.stream])
    ids = rng.choice(999_999, size=n_train + n_val, replace=False) + 1
    return {
        "train": sorted(int(i) for i in ids[:n_train]),
        "val": sorted(int(i) for i in ids[n_train:]),
    }


def _file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def _is_complete(root: Path, marker_name: str, marker: dict) -> bool:
    """The marker matches and every annotation file and image it lists is present."""
    try:
        if json.loads((root / marker_name).read_text(encoding="utf-8")) != marker:
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


def _start_over(root: Path, marker_name: str, split_ids: dict[str, list[int]]) -> None:
    """Make the folders and drop the marker, temporary files and images of a different run.

    Without the marker an interrupted run cannot look complete; without the
    strays a rerun writes exactly what a fresh run writes.
    """
    (root / marker_name).unlink(missing_ok=True)
    for folder in ("train2014", "val2014", "annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in split_ids.items():
        prune_image_folder(root / f"{split}2014", {_file_name(split, i) for i in ids})
    for path in [*root.iterdir(), *(root / "annotations").iterdir()]:
        if is_temporary(path) and path.is_file():
            path.unlink()


def _write_image(
    source: SyntheticSource, root: Path, split: str, image_id: int, seed: int
) -> _Written:
    """Draw, save and word one picture."""
    # Each image has its own stream, so it does not depend on its neighbours.
    drawn = source.draw(np.random.default_rng([seed, *source.stream, image_id]))
    file_name = _file_name(split, image_id)
    atomic_write(root / f"{split}2014" / file_name, jpeg_bytes(drawn.pixels))
    height, width = drawn.pixels.shape[:2]
    image = {
        "id": image_id,
        "file_name": file_name,
        "width": width,
        "height": height,
        "license": 1,
        "flickr_url": "",
        "coco_url": f"http://images.cocodataset.org/{split}2014/{file_name}"
        if source.coco_urls
        else "",
        "date_captured": drawn.date_captured,
    }
    return _Written(image, drawn.captions, drawn.instances)


def _header(source: SyntheticSource, split: str, seed: int) -> dict[str, Any]:
    return {
        "info": {
            "description": f"Captioning {source.name} data set ({split}, seed {seed}): "
            f"{source.subject}",
            "url": "",
            "version": str(source.version),
            "year": 2014,
            "contributor": f"captioning.data.{source.name}",
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


def _instance(image_id: int, instance: Instance, category_id: int, instance_id: int) -> dict:
    """One object as a COCO instance annotation, the source's attributes alongside."""
    area = sum((-1 if n else 1) * polygon_area(p) for n, p in enumerate(instance.polygons))
    return {
        "id": instance_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": instance.bbox,
        "area": round(area, 2),
        "iscrowd": 0,
        # COCO polygons have no holes: the segmentation is the outline.
        "segmentation": [[round(float(v), 2) for v in instance.polygons[0].reshape(-1)]],
        "attributes": instance.attributes,
    }


def _write_annotations(
    source: SyntheticSource,
    root: Path,
    split: str,
    seed: int,
    written: list[_Written],
    caption_ids: Iterator[int],
    instance_ids: Iterator[int],
) -> None:
    """Write the split's instances and captions files; ids continue from the given counters."""
    category_ids = {kind: i + 1 for i, kind in enumerate(source.kinds)}
    images = [w.image for w in written]
    captions = {
        **_header(source, split, seed),
        "images": images,
        "annotations": [
            {"id": next(caption_ids), "image_id": w.image["id"], "caption": text}
            for w in written
            for text in w.captions
        ],
    }
    instances = {
        **_header(source, split, seed),
        "images": images,
        "annotations": [
            _instance(w.image["id"], obj, category_ids[obj.kind], next(instance_ids))
            for w in written
            for obj in w.instances
        ],
        "categories": [
            {"id": i, "name": kind, "supercategory": source.supercategory}
            for kind, i in category_ids.items()
        ],
    }
    for name, content in (("instances", instances), ("captions", captions)):
        atomic_write(root / "annotations" / f"{name}_{split}2014.json", json.dumps(content))


def read_instances(instances_json_path: str | Path) -> dict[int, list[dict]]:
    """image_id -> [{kind, <the source's attributes>, bbox}] from a generated instances file."""
    instances = json.loads(Path(instances_json_path).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, list[dict]] = {img["id"]: [] for img in instances["images"]}
    for ann in instances["annotations"]:
        objects[ann["image_id"]].append(
            {"kind": names[ann["category_id"]], **ann["attributes"], "bbox": list(ann["bbox"])}
        )
    return objects
