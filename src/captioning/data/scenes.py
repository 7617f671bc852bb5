"""The scenes data set (`data.source: scenes`): a second generated set in the COCO 2014 layout.

The demo (`captioning.data.demo`) is what the defaults were tuned on; this set
exists to check that a choice carries to data the project was not tuned on
(docs/experiments.md, "Selection across data sets"). Its pictures, objects,
layout and caption grammar all differ from the demo's (`scenes_drawing`,
`scenes_captions`); what it shares is the generator and file layout
(`captioning.data.synthetic`), so every stage reads it unchanged.
`generate_scenes` takes the same sizes and seed as the demo
(`data.demo_train_images`, `data.demo_val_images`, `data.seed`). `load_groups`
reads each image's groups back from the instances file, for the scorer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captioning.data import scenes_drawing
from captioning.data.scenes_captions import CAPTIONS_PER_IMAGE, TRUTH_RULES, describe
from captioning.data.synthetic import Drawn, Instance, SyntheticSource, generate, read_instances


def draw(rng: np.random.Generator) -> Drawn:
    """One scenes image from its random stream: the picture, its date, captions and tokens."""
    scene = scenes_drawing.sample_scene(rng)
    pixels = scenes_drawing.render_scene(scene, rng)
    day, hour, minute = (int(rng.integers(lo, hi)) for lo, hi in ((1, 29), (0, 24), (0, 60)))
    date = f"2013-06-{day:02d} {hour:02d}:{minute:02d}:00"
    instances = [
        Instance(obj["kind"], obj["bbox"], obj["polygons"], {
            "colour": obj["colour"], "texture": obj["texture"], "group": obj["group"],
            "count": scene["groups"][obj["group"]]["count"],
        })
        for obj in scene["objects"]
    ]  # fmt: skip
    return Drawn(pixels, date, describe(scene, rng), instances)


def load_groups(instances_json_path: str | Path) -> dict[int, list[dict]]:
    """image_id -> [{kind, colour, texture, count, boxes}] from a scenes instances file."""
    found = {}
    for image_id, objects in read_instances(instances_json_path).items():
        groups: dict[int, dict] = {}
        for obj in objects:
            group = groups.setdefault(obj["group"], {
                **{k: obj[k] for k in ("kind", "colour", "texture", "count")}, "boxes": [],
            })  # fmt: skip
            group["boxes"].append(obj["bbox"])
        found[image_id] = [groups[k] for k in sorted(groups)]
    return found


SOURCE = SyntheticSource(
    name="scenes",
    version=1,
    subject="groups of tokens",
    kinds=scenes_drawing.KINDS,
    supercategory="token",
    captions_per_image=CAPTIONS_PER_IMAGE,
    stream=(26,),  # ids and pictures apart from the demo's for the same seed
    coco_urls=False,
    draw=draw,
    read_truth=load_groups,
    rules=TRUTH_RULES,
)
MARKER_NAME = SOURCE.marker_name


def generate_scenes(root: str | Path, n_train: int, n_val: int, seed: int) -> dict:
    """Write the scenes data set under root in the COCO 2014 layout; a no-op when already there."""
    return generate(SOURCE, root, n_train, n_val, seed)
