"""Tests for the Spark jobs on a real `local[2]` session: feature extraction and batch captioning.

One Spark session serves the module (starting the JVM costs seconds). Feature
extraction runs InceptionV3 at its smallest input (75 px) on demo images and
must write the local engine's store byte for byte; batch captioning captions
demo images with a small registered model through `mlflow.pyfunc.spark_udf`
and is compared with `captioning caption` on the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("pyspark")

from captioning.data.demo import generate_demo  # noqa: E402
from captioning.features import build_extractor, extract_features  # noqa: E402
from captioning.features.manifest import part_manifest_name  # noqa: E402
from captioning.features.spark import extract_features_spark  # noqa: E402
from captioning.spark_session import spark_session  # noqa: E402

pytestmark = pytest.mark.slow

SMALL = 75  # InceptionV3's minimum input: a 1x1 grid, fast on two cores
STORE = {"image_size": SMALL, "batch_size": 2, "shard_size": 3}


@pytest.fixture(scope="module")
def spark():
    session = spark_session("local[2]", "captioning tests")
    yield session
    session.stop()


def _demo_table(root: Path) -> pd.DataFrame:
    """image_id, path, split of a small demo set: train and val, several shards each."""
    generate_demo(root, 7, 4, seed=3)
    rows = []
    for split in ("train", "val"):
        annotations = json.loads((root / "annotations" / f"captions_{split}2014.json").read_text())
        for image in annotations["images"]:
            path = root / f"{split}2014" / image["file_name"]
            rows.append({"image_id": image["id"], "path": str(path), "split": split})
    return pd.DataFrame(rows)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory) -> pd.DataFrame:
    return _demo_table(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, demo_images) -> Path:
    out = tmp_path_factory.mktemp("local") / "features"
    extractor = build_extractor("none", SMALL, 0)
    extract_features(demo_images, out, extractor, progress=False, **STORE)
    return out


def _spark_extract(spark, images, out):
    return extract_features_spark(spark, images, out, weights="none", seed=0, **STORE)


def test_spark_extraction_equals_local_byte_for_byte(spark, tmp_path, demo_images, local_store):
    out = tmp_path / "features"
    index = _spark_extract(spark, demo_images, out)
    assert sorted(index["shard"].unique()) == [
        "train-00000.shard",
        "train-00001.shard",
        "train-00002.shard",
        "val-00000.shard",
        "val-00001.shard",
    ]
    assert _files(out) == _files(local_store)  # shards, manifest, index


def test_spark_extraction_resumes_a_killed_job(spark, tmp_path, demo_images, local_store):
    """A killed job left two shards and its tasks' records; the rerun writes only the rest."""
    out = tmp_path / "features"
    out.mkdir()
    local = _files(local_store)
    manifest = json.loads(local["manifest.json"])["shards"]
    for name in ("train-00001.shard", "val-00000.shard"):
        (out / name).write_bytes(local[name])
    from captioning.features.manifest import write_part_manifest

    write_part_manifest(out, 0, 5, {"train-00001.shard": manifest["train-00001.shard"]})
    write_part_manifest(out, 3, 5, {"val-00000.shard": manifest["val-00000.shard"]})
    (out / "train-00002.shard").write_bytes(local["train-00002.shard"][:100])  # cut off mid-write
    kept = {n: (out / n).stat().st_mtime_ns for n in ("train-00001.shard", "val-00000.shard")}

    _spark_extract(spark, demo_images, out)
    assert _files(out) == local
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # not rewritten
    assert not (out / part_manifest_name(0, 5)).exists()

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".shard"}
    _spark_extract(spark, demo_images, out)  # finished: nothing to extract
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".shard"} == before
