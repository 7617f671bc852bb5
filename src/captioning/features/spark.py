"""Feature extraction on Apache Spark: the local engine's store, written by executors.

`extract_features_spark` writes the same store as
`captioning.features.extraction.extract_features` (same shards, content keys,
manifest and index, byte for byte) with the work spread over a Spark
cluster. The driver plans the shards with the local engine's code; one Spark
job hashes every shard's images on the executors (its content key); the
driver keeps the shards the records vouch for; a second job runs the same
extractor over the missing shards, one shard per task, the extractor built
once per executor's Python worker, each shard written atomically to the
shared store beside its own part record (`manifest.part-K-of-N.json`), so a
killed job loses no finished shard; the driver then folds the records into
`manifest.json` and writes the index last. The store, the images and the
weights must be at the same path on every host (a shared file system).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from captioning.atomic_files import atomic_path
from captioning.data.images import DEFAULT_MAX_PIXELS
from captioning.features.extraction import (
    _add_keys,
    _batches,
    _forward,
    _index_table,
    _keep_finished_shards,
    _model_key,
    _plan_shards,
    _shard_features,
    _unique_images,
)
from captioning.features.extractor import build_extractor
from captioning.features.manifest import remove_part_manifests, write_manifest, write_part_manifest
from captioning.features.shards import write_shard
from captioning.features.store import INDEX_FILE

log = logging.getLogger(__name__)

# (weights, image_size, seed) -> extractor, per executor Python worker (reused between tasks).
_EXECUTOR_EXTRACTORS: dict[tuple[str, int, int], object] = {}


class _NoProgress:
    def update(self, n: int) -> None:
        pass


def _executor_extractor(weights: str, image_size: int, seed: int):
    """The extractor for these settings, built on the first task of this worker only."""
    key = (weights, image_size, seed)
    if key not in _EXECUTOR_EXTRACTORS:
        _EXECUTOR_EXTRACTORS[key] = build_extractor(weights, image_size, seed)
    return _EXECUTOR_EXTRACTORS[key]


def _shard_key(shard: dict, model_key: dict) -> tuple[str, str]:
    """Executor: (name, content key) of one planned shard; reads its images once."""
    _add_keys([shard], model_key)
    return shard["name"], shard["key"]


def _extract_partition(index: int, shards, job: dict):
    """Executor: extract this task's shards into the store; yields (name, key) of each."""
    out = Path(job["out"])
    extractor = _executor_extractor(job["weights"], job["image_size"], job["seed"])
    model_key = _model_key(extractor, job["image_size"], job["batch_size"])
    if model_key != job["model_key"]:
        raise RuntimeError(
            f"executor's extractor {model_key} differs from the driver's {job['model_key']}: "
            "are the weights the same file on every host?"
        )
    forward = _forward(extractor, job["image_size"])
    shape = tuple(extractor.output_shape[1:])  # (L, C)
    mine = list(shards)
    records: dict[str, str | None] = {s["name"]: None for s in mine}
    write_part_manifest(out, index, job["parts"], records)  # nothing vouched for while rewriting
    for shard in mine:
        batches = iter(_batches([shard], job["image_size"], job["batch_size"], job["max_pixels"]))
        features = _shard_features(
            shard, batches, forward, shape, job["batch_size"], _NoProgress()
        )  # (n, L, C)
        write_shard(out / shard["name"], features)
        records[shard["name"]] = shard["key"]
        write_part_manifest(out, index, job["parts"], records)
        yield shard["name"], shard["key"]


def _plain(shards: list[dict]) -> list[dict]:
    """Shards with plain Python values, cheap to ship to executors."""
    return [
        {
            "name": s["name"],
            "split": s["split"],
            "image_ids": [int(i) for i in s["image_ids"]],
            "paths": list(s["paths"]),
            **({"key": s["key"]} if "key" in s else {}),
        }
        for s in shards
    ]


def extract_features_spark(
    spark,
    images: pd.DataFrame,
    out_dir: str | Path,
    weights: str,
    image_size: int,
    seed: int,
    batch_size: int,
    shard_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> pd.DataFrame:
    """Write the feature store for `images` on `spark`'s executors; returns its index.

    Same arguments and result as `extract_features` (the extractor given by
    `weights`, `image_size`, `seed`, as `build_extractor` takes them, since each
    executor builds its own), and the same store, byte for byte.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    extractor = build_extractor(weights, image_size, seed)  # the driver's: key, shape
    model_key = _model_key(extractor, image_size, batch_size)
    shape = tuple(extractor.output_shape[1:])  # (L, C)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(_unique_images(images), shard_size)
    sc = spark.sparkContext

    plain = _plain(shards)
    keys = dict(
        sc.parallelize(plain, max(1, len(plain))).map(lambda s: _shard_key(s, model_key)).collect()
    )
    for shard in shards:
        shard["key"] = keys[shard["name"]]
    done = _keep_finished_shards(out, shards, shape)  # also folds a killed job's part records in
    pending = _plain([s for s in shards if s["name"] not in done])
    log.info("features (spark): %d shards kept, %d to write", len(done), len(pending))

    if pending:
        job = {
            "out": str(out.resolve()),
            "weights": weights,
            "image_size": image_size,
            "seed": seed,
            "batch_size": batch_size,
            "max_pixels": max_pixels,
            "model_key": model_key,
            "parts": len(pending),
        }
        written = (
            sc.parallelize(pending, len(pending))
            .mapPartitionsWithIndex(lambda i, part: _extract_partition(i, part, job))
            .collect()
        )
        done.update(dict(written))
    write_manifest(out, done)
    remove_part_manifests(out)
    index = _index_table(shards)
    with atomic_path(out / INDEX_FILE, ".parquet") as tmp:
        index.to_parquet(tmp, index=False)
    return index
