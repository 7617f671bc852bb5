"""The embedded demo data set: seeded synthetic scenes of shapes, written in the COCO 2014 layout.

`generate_demo` writes it through the generator shared with the scenes data
set (`captioning.data.synthetic`); what is the demo's own is `draw`: every
image's scene (`captioning.data.demo_scenes`), worded five ways
(`captioning.data.demo_captions`), and its objects' kind, colour, size and
grid position, which the instance files carry and the demo's scorer grades
captions against. The pipeline runs on it end to end without a download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captioning.data import demo_scenes
from captioning.data.demo_captions import CAPTIONS_PER_IMAGE, TRUTH_RULES, describe
from captioning.data.synthetic import Drawn, Instance, SyntheticSource, generate, read_instances


def draw(rng: np.random.Generator) -> Drawn:
    """One demo image from its random stream: the picture, its date, captions and objects."""
    objects = demo_scenes.sample_objects(rng)
    pixels = demo_scenes.render_scene(objects, rng)
    month, day, hour, minute, sec = (
        int(rng.integers(lo, hi)) for lo, hi in ((1, 13), (1, 29), (0, 24), (0, 60), (0, 60))
    )
    date = f"2013-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{sec:02d}"
    instances = [
        Instance(
            o["kind"], o["bbox"], [o["points"]], {k: o[k] for k in ("colour", "size", "position")}
        )
        for o in objects
    ]
    return Drawn(pixels, date, describe(objects, rng), instances)


SOURCE = SyntheticSource(
    name="demo",
    version=5,
    subject="synthetic shapes",
    kinds=demo_scenes.KINDS,
    supercategory="shape",
    captions_per_image=CAPTIONS_PER_IMAGE,
    stream=(),
    coco_urls=True,
    draw=draw,
    read_truth=read_instances,  # image_id -> [{kind, colour, size, position, bbox}]
    rules=TRUTH_RULES,
)
MARKER_NAME = SOURCE.marker_name


def generate_demo(root: str | Path, n_train: int, n_val: int, seed: int) -> dict:
    """Write the demo data set under root in the COCO 2014 layout; a no-op when already there."""
    return generate(SOURCE, root, n_train, n_val, seed)
