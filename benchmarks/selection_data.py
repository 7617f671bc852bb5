"""The data sets of the selection protocol (`benchmarks.selection`), prepared once into a cache.

Each data set is a `data` section (the demo at N and 2N images, the scenes
source at N: `captioning.data.scenes`, built to differ from the demo) run
through the pipeline's own functions in the order dvc.yaml runs the stages:
`prepare_source` (download), `validate_dataset` (validate), `extract_features`
with params.yaml's features section (`weights: none` offline, as the
committed pipeline), `encode_splits` (tokenize). A marker holding the
sections that made a folder lets a rerun skip it; a folder made with other
settings is rebuilt (extraction keeps the shards it can reuse).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from captioning.atomic_files import atomic_write
from captioning.config import (
    DataParams,
    FeaturesParams,
    SplitParams,
    TokenizeParams,
    ValidateParams,
    from_dict,
)
from captioning.data.sources import prepare_source
from captioning.data.text import Vocabulary, encode_splits
from captioning.data.validation import validate_dataset
from captioning.features import build_extractor, extract_features, write_extractor_spec

MARKER = "prepared.json"


class Prepared(NamedTuple):
    """Where one data set's pipeline outputs are, as the stages lay them out."""

    raw: Path
    table: Path
    features: Path
    tokens: Path

    def vocabulary(self) -> Vocabulary:
        return Vocabulary.from_json((self.tokens / "vocab.json").read_text())

    def extractor_spec(self) -> dict:
        return json.loads((self.features / "extractor.json").read_text())


def data_sets(images: int, kinds: list[str]) -> dict[str, dict]:
    """{name: data-section overrides}: the demo at `images` and twice that, the scenes at `images`.

    Val images (split into val and test by the validate stage) are 12% of the
    train images, the demo default's 240 for 2000.
    """
    val = max(8, round(0.12 * images))
    known = {
        "demo": (f"demo-{images}", {"source": "demo", "demo_train_images": images,
                                    "demo_val_images": val}),
        "demo2x": (f"demo-{2 * images}", {"source": "demo", "demo_train_images": 2 * images,
                                          "demo_val_images": 2 * val}),
        "scenes": (f"scenes-{images}", {"source": "scenes", "demo_train_images": images,
                                        "demo_val_images": val}),
    }  # fmt: skip
    unknown = sorted(set(kinds) - set(known))
    if unknown:
        raise ValueError(f"unknown data set kind(s) {unknown}; choose from {sorted(known)}")
    return dict(known[k] for k in kinds)


def prepare(folder: Path, data: dict, params: dict, extractor_cache: dict) -> Prepared:
    """The data set `data` (data-section overrides) through download..tokenize into `folder`.

    `params` is params.yaml as a mapping: its data, split, validate, features
    and tokenize sections are the base. `extractor_cache` keeps one extractor
    between data sets.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sections = {
        "data": from_dict(DataParams, "data", {**params.get("data", {}), **data}),
        "split": from_dict(SplitParams, "split", params.get("split")),
        "validate": from_dict(ValidateParams, "validate", params.get("validate")),
        "features": from_dict(FeaturesParams, "features", params.get("features")),
        "tokenize": from_dict(TokenizeParams, "tokenize", params.get("tokenize")),
    }
    out = Prepared(folder / "raw", folder / "captions.parquet", folder / "features",
                   folder / "tokens")  # fmt: skip
    marker = {name: dataclasses.asdict(section) for name, section in sections.items()}
    try:
        if json.loads((folder / MARKER).read_text()) == marker:
            return out
    except (OSError, ValueError):
        pass
    (folder / MARKER).unlink(missing_ok=True)
    root = prepare_source(sections["data"], out.raw)
    validate_dataset(root, sections["split"], sections["validate"], out.table,
                     folder / "validation", folder / "quarantine.json")  # fmt: skip
    _features(out, sections["features"], sections["validate"].max_pixels, extractor_cache)
    _tokenize(out, sections["tokenize"])
    atomic_write(folder / MARKER, json.dumps(marker, indent=2))
    return out


def _features(out: Prepared, params: FeaturesParams, max_pixels: int, cache: dict) -> None:
    key = (params.weights, params.image_size, params.seed)
    if key not in cache:
        cache[key] = build_extractor(params.weights, params.image_size, params.seed)
    images = pd.read_parquet(out.table, columns=["image_id", "path", "split"])
    extract_features(
        images.drop_duplicates("image_id"), out.features, cache[key],
        batch_size=params.batch_size, shard_size=params.shard_size,
        image_size=params.image_size, max_pixels=max_pixels, progress=False,
    )  # fmt: skip
    write_extractor_spec(out.features, cache[key], params.weights, params.image_size, params.seed)


def _tokenize(out: Prepared, params: TokenizeParams) -> None:
    """What the tokenize stage writes: vocab.json and <split>.npy, <split>_image_ids.npy."""
    table = pd.read_parquet(out.table)
    vocabulary, encoded = encode_splits(
        table["caption"].tolist(), table["image_id"].tolist(), table["split"].tolist(),
        params.vocab_size, params.max_len,
    )  # fmt: skip
    out.tokens.mkdir(parents=True, exist_ok=True)
    (out.tokens / "vocab.json").write_text(vocabulary.to_json())
    for split, (tokens, image_ids) in encoded.items():
        np.save(out.tokens / f"{split}.npy", tokens)
        np.save(out.tokens / f"{split}_image_ids.npy", image_ids)
