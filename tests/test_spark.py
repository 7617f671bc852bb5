"""Tests for the Spark jobs on a real `local[2]` session: feature extraction and batch captioning.

One Spark session serves the module (starting the JVM costs seconds). Feature
extraction runs InceptionV3 at its smallest input (75 px) on demo images and
must write the local engine's store byte for byte; batch captioning captions
demo images with a small registered model through `mlflow.pyfunc.spark_udf`
and is compared with `captioning caption` on the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

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


# ----------------------------------------------------------------------------- batch captioning


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_captioner):
    """A tiny untrained captioner (75 px) registered as image-captioner@champion in a sqlite store."""
    import mlflow
    from mlflow import MlflowClient

    from captioning.serving.pyfunc import ServingConfig, log_captioner_model
    from captioning.training.checkpoints import save_model

    root = tmp_path_factory.mktemp("registry")
    keras_path = root / "tiny.keras"
    sizes = {"embedding_dim": 8, "units": 8, "attention_units": 8, "encoder_dim": 8}
    save_model(tiny_captioner(None, (1, 2048), image_size=SMALL, **sizes), keras_path)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    config = ServingConfig(max_batch=4, max_length=12, max_pixels=400 * 400,
                           max_image_bytes=200_000)  # fmt: skip
    with mlflow.start_run():
        info = log_captioner_model(keras_path, config)
    version = mlflow.register_model(info.model_uri, "image-captioner")
    MlflowClient().set_registered_model_alias("image-captioner", "champion", version.version)
    yield keras_path, str(version.version)
    mlflow.set_tracking_uri(previous)


def _collection(root: Path, images: pd.DataFrame) -> tuple[list[Path], dict[str, str]]:
    """Demo images as img_N.jpg beside broken files; (good paths, {broken name: error start})."""
    root.mkdir()
    good = []
    for n, path in enumerate(images["path"][:6]):
        good.append(root / f"img_{n}.jpg")
        good[-1].write_bytes(Path(path).read_bytes())
    jpeg = good[0].read_bytes()
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.txt").write_text("not an image\n")
    Image.new("L", (1000, 1000)).save(root / "huge_pixels.png")  # 10^6 px > max_pixels
    (root / "huge_bytes.jpg").write_bytes(jpeg + os.urandom(250_000))  # > max_image_bytes
    broken = {
        "empty.jpg": "empty_file",
        "truncated.jpg": "truncated",
        "notes.txt": "image: not an image format",
        "huge_pixels.png": "image: 1000x1000",
        "huge_bytes.jpg": "image: about",
    }
    return good, broken


def _rows(output: Path) -> pd.DataFrame:
    table = pd.read_parquet(output)
    table["name"] = table["path"].map(lambda p: Path(p.removeprefix("file:")).name)
    return table.set_index("name").sort_index()


def test_batch_captions_equal_captioning_caption_and_bad_files_give_error_rows(
    spark, tmp_path, demo_images, registered, capsys
):
    from captioning import cli
    from captioning.serving.batch import caption_collection

    keras_path, version = registered
    good, broken = _collection(tmp_path / "photos", demo_images)
    out = tmp_path / "captions.parquet"
    first = caption_collection(
        spark, str(tmp_path / "photos" / "img_[0-2].jpg"), str(out),
        "models:/image-captioner@champion", batch_size=2,
    )  # fmt: skip
    assert (first.captioned, first.failed, first.skipped) == (3, 0, 0)
    assert first.model_uri == f"models:/image-captioner/{version}"

    summary = caption_collection(
        spark, str(tmp_path / "photos"), str(out), "models:/image-captioner@champion"
    )
    assert (summary.captioned, summary.failed, summary.skipped) == (3, len(broken), 3)
    rows = _rows(out)
    assert len(rows) == len(good) + len(broken)  # one row per file: resume appended no twins
    assert set(rows["model_version"]) == {version}

    assert cli.main(["caption", *map(str, good), "--model", str(keras_path), "--json",
                     "--max-len", "12"]) == 0  # fmt: skip
    expected = {
        Path(line["image"]).name: line["caption"]
        for line in map(json.loads, capsys.readouterr().out.splitlines())
    }
    captioned = rows[rows["error"].isna()]
    assert captioned["caption"].to_dict() == expected
    failed = rows[rows["error"].notna()]
    assert sorted(failed.index) == sorted(broken)
    for name, start in broken.items():
        assert failed.loc[name, "caption"] == ""
        assert start in failed.loc[name, "error"], failed.loc[name, "error"]

    again = caption_collection(spark, str(tmp_path / "photos"), str(out),
                               "models:/image-captioner@champion")  # fmt: skip
    assert (again.captioned, again.failed, again.skipped) == (0, 0, len(good) + len(broken))
    assert len(_rows(out)) == len(rows)


def test_a_worker_loads_the_model_once_and_checks_images_without_tensorflow(registered):
    """Spark's local mode loads the pyfunc per task: the second load in a process is free.

    The image check runs in its own Python worker, which must not pay for TensorFlow.
    """
    import subprocess
    import sys

    import mlflow.pyfunc

    first, second = (
        mlflow.pyfunc.load_model("models:/image-captioner@champion").unwrap_python_model()
        for _ in range(2)
    )
    assert first is not second and first.captioner is second.captioner
    probe = "import sys, captioning.serving.batch, captioning.serving.request_checks; "
    probe += "print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    assert imported.strip() == "[]"
