"""Where the raw data comes from: generate a synthetic set, point at a local folder, or download.

`prepare_source` is the download stage's one call. Whatever the source, it ends
with a folder in the COCO 2014 layout and a small `dataset.json` beside it
naming the source and that folder, which is how later stages find the data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from captioning.atomic_files import write_if_changed
from captioning.config import DataParams
from captioning.data import demo, scenes
from captioning.data.scorers import SourceScorer
from captioning.data.synthetic import SyntheticSource, generate

REF_NAME = "dataset.json"
# The sources written offline, at data.demo_train_images / demo_val_images and data.seed.
GENERATED: dict[str, SyntheticSource] = {"demo": demo.SOURCE, "scenes": scenes.SOURCE}
LAYOUT = ("annotations/captions_train2014.json", "annotations/captions_val2014.json")


class SourceError(RuntimeError):
    """The configured data source cannot be used as it is."""


def check_layout(root: Path) -> None:
    """Fail with the missing pieces if `root` is not a COCO 2014 layout folder."""
    missing = [p for p in (*LAYOUT, "train2014", "val2014") if not (root / p).exists()]
    if missing:
        raise SourceError(
            f"{root} is not in the COCO 2014 layout: missing {', '.join(missing)} "
            "(expected train2014/, val2014/ and annotations/captions_{train,val}2014.json)"
        )


def prepare_source(params: DataParams, raw_dir: str | Path) -> Path:
    """Make the data of `params.source` available under `raw_dir`; returns the layout root."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    if params.source in GENERATED:
        root = raw_dir / params.source
        source = GENERATED[params.source]
        generate(source, root, params.demo_train_images, params.demo_val_images, params.seed)
    elif params.source == "local":
        if not params.path:
            raise SourceError("data.source is 'local' but data.path is not set")
        root = Path(params.path).expanduser()
        if not root.is_dir():
            raise SourceError(f"data.path {params.path!r} is not a folder")
    else:
        from captioning.data.fetch import fetch_source  # network code only when needed

        root = fetch_source(params, raw_dir / params.source)
    check_layout(root)
    write_dataset_ref(raw_dir, params.source, root)
    return root


def write_dataset_ref(raw_dir: Path, source: str, root: Path) -> None:
    """Write dataset.json only when it changes (atomically), so a no-op rerun changes no file."""
    # Repo-relative when inside the repo, so the file is the same on every clone.
    relative = os.path.relpath(root)
    shown = str(root.resolve()) if relative.startswith("..") else relative
    write_if_changed(
        raw_dir / REF_NAME, json.dumps({"source": source, "root": shown}, indent=2) + "\n"
    )


def read_dataset_ref(raw_dir: str | Path) -> dict:
    """{"source", "root"} written by the download stage."""
    ref = Path(raw_dir) / REF_NAME
    if not ref.exists():
        raise SourceError(f"{ref} not found: run the download stage first (dvc repro download)")
    return json.loads(ref.read_text())


def source_scorer(raw_dir: str | Path) -> SourceScorer | None:
    """The current source's own scorer (`captioning.data.scorers`), or None when it has none.

    Only the generated sources have one (`captioning.data.scorers.TruthScorer`):
    their scenes are known exactly (every object's kind, colour, place and box).
    """
    dataset = read_dataset_ref(raw_dir)
    factory = SCORERS.get(dataset["source"])
    return factory(Path(dataset["root"])) if factory else None


# A source that knows more about its images than their captions registers its scorer here.
SCORERS: dict[str, Callable[[Path], SourceScorer]] = {
    name: source.scorer for name, source in GENERATED.items()
}
