"""Tests for captioning.features: extractor weights, the shard files, extraction and the store.

Also the image preprocessing it feeds the extractor (`captioning.features.preprocessing`).
Real InceptionV3 models on a few tiny generated images. Most tests use the
smallest input InceptionV3 accepts (75 px, one location) to stay fast; one
extraction runs at 299 px to check the (64, 2048) grid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

import captioning.features.extraction as extraction_module
import captioning.features.extractor as extractor_module
from captioning.atomic_files import temporary_sibling
from captioning.features import (
    FeatureStore,
    WeightsUnavailableError,
    build_extractor,
    bytes_per_image,
    extract_features,
    read_shard,
    weights_digest,
    write_extractor_spec,
    write_shard,
)
from captioning.features import shards as shard_module
from captioning.features.preprocessing import load_image, preprocess_image, preprocess_pixels

SMALL = 75  # InceptionV3's minimum input: its output grid is 1x1


def _write_image(path: Path, size: tuple[int, int], seed: int, fmt: str, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, format=fmt)


def _image_table(root: Path, ids_and_splits: list[tuple[int, str]], seed: int = 0) -> pd.DataFrame:
    """Images of assorted formats and sizes; ids given out of order on purpose."""
    root.mkdir(parents=True, exist_ok=True)
    kinds = [("JPEG", "RGB"), ("PNG", "RGB"), ("JPEG", "L"), ("PNG", "RGBA")]
    rows = []
    for n, (image_id, split) in enumerate(ids_and_splits):
        fmt, mode = kinds[n % len(kinds)]
        path = root / f"img_{image_id}.jpg"  # PNGs too: the content decides
        _write_image(path, (40 + 13 * n, 30 + 7 * n), seed + image_id, fmt, mode)
        rows.append({"image_id": image_id, "path": str(path), "split": split})
    return pd.DataFrame(rows)


IDS = [
    (17, "train"),
    (3, "val"),
    (5, "train"),
    (11, "train"),
    (2, "train"),
    (40, "val"),
    (9, "train"),
]


@pytest.fixture(scope="module")
def small_extractor() -> keras.Model:
    return build_extractor("none", image_size=SMALL, seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    return _image_table(tmp_path_factory.mktemp("images"), IDS)


def _extract(images, out, extractor, **kwargs):
    options = {"batch_size": 2, "shard_size": 3, "image_size": SMALL, "progress": False}
    return extract_features(images, out, extractor, **(options | kwargs))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _bits(array: np.ndarray) -> np.ndarray:
    """float16 bit patterns: compares NaN, -0.0 and subnormals exactly."""
    assert array.dtype == np.float16
    return array.view(np.uint16)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_image_shape_and_range(tmp_path):
    _write_image(tmp_path / "a.jpg", (50, 31), 1, "JPEG")
    image = preprocess_image((tmp_path / "a.jpg").read_bytes(), image_size=SMALL)
    assert image.shape == (SMALL, SMALL, 3) and image.dtype == tf.float32
    assert -1.0 <= float(tf.reduce_min(image)) < float(tf.reduce_max(image)) <= 1.0

    Image.new("RGB", (20, 10), (255, 255, 255)).save(tmp_path / "white.png")
    Image.new("RGB", (20, 10), (0, 0, 0)).save(tmp_path / "black.png")
    np.testing.assert_allclose(preprocess_image((tmp_path / "white.png").read_bytes(), 80), 1.0)
    np.testing.assert_allclose(preprocess_image((tmp_path / "black.png").read_bytes(), 80), -1.0)
    assert preprocess_image((tmp_path / "a.jpg").read_bytes()).shape == (299, 299, 3)


def test_png_named_jpg_and_grey_or_alpha_images_decode(tmp_path):
    _write_image(tmp_path / "png.jpg", (33, 21), 2, "PNG", "RGBA")
    _write_image(tmp_path / "grey.jpg", (33, 21), 3, "JPEG", "L")
    for name in ("png.jpg", "grey.jpg"):
        assert preprocess_image((tmp_path / name).read_bytes(), SMALL).shape == (SMALL, SMALL, 3)


def test_preprocess_image_in_tf_data_matches_eager(images):
    paths = images["path"].tolist()
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: load_image(p, SMALL), num_parallel_calls=tf.data.AUTOTUNE
    )
    for path, in_graph in zip(paths, dataset, strict=True):
        eager = preprocess_image(Path(path).read_bytes(), SMALL)
        np.testing.assert_array_equal(in_graph.numpy(), eager.numpy())


# ----------------------------------------------------------------------------- extractor


def test_random_init_is_seeded(small_extractor):
    same = build_extractor("none", image_size=SMALL, seed=0)
    other = build_extractor("none", image_size=SMALL, seed=1)
    assert small_extractor.output_shape == (None, 1, 2048)
    assert weights_digest(same) == weights_digest(small_extractor)
    assert weights_digest(other) != weights_digest(small_extractor)


def test_imagenet_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with socket.socket() as probe:  # a local port nobody listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(extractor_module, "IMAGENET_NOTOP_URL", f"http://127.0.0.1:{port}/w.h5")
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        build_extractor("imagenet", image_size=SMALL)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    cache = tmp_path / "keras" / "models" / extractor_module.IMAGENET_NOTOP_FILE
    for needed in (
        str(cache),
        f"127.0.0.1:{port}",
        "features.weights: none",
        "features.weights: /",
    ):
        assert needed in message
    assert not cache.exists() and not any(cache.parent.iterdir())  # no partial file left


def test_corrupt_cached_imagenet_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(extractor_module, "IMAGENET_NOTOP_URL", "http://127.0.0.1:1/w.h5")
    cache = tmp_path / "models" / extractor_module.IMAGENET_NOTOP_FILE
    cache.parent.mkdir()
    cache.write_bytes(b"half a file")
    with pytest.raises(WeightsUnavailableError, match="md5"):
        build_extractor("imagenet", image_size=SMALL)


def test_missing_weights_path_raises(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        build_extractor(str(tmp_path / "nope.weights.h5"), image_size=SMALL)


def test_weights_files_load(tmp_path, small_extractor):
    """A native .weights.h5 and a legacy no-top .h5 (keras.applications' layout) load."""
    from keras.src.legacy.saving import legacy_h5_format

    expected = weights_digest(small_extractor)
    small_extractor.save_weights(tmp_path / "x.weights.h5")
    assert weights_digest(build_extractor(str(tmp_path / "x.weights.h5"), SMALL)) == expected

    with h5py.File(tmp_path / "notop.h5", "w") as fh:
        legacy_h5_format.save_weights_to_hdf5_group(fh, small_extractor)
    assert weights_digest(build_extractor(str(tmp_path / "notop.h5"), SMALL)) == expected


@pytest.mark.slow
def test_with_top_weights_file_loads_its_backbone(tmp_path):
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(5)
    with_top = keras.applications.InceptionV3(weights=None, input_shape=(SMALL, SMALL, 3))
    with h5py.File(tmp_path / "top.h5", "w") as fh:
        legacy_h5_format.save_weights_to_hdf5_group(fh, with_top)
    loaded = build_extractor(str(tmp_path / "top.h5"), SMALL)
    top_weights = with_top.get_weights()
    assert len(loaded.weights) == len(top_weights) - 2  # all but the classifier's kernel and bias
    for mine, theirs in zip(loaded.get_weights(), top_weights, strict=False):
        np.testing.assert_array_equal(mine, theirs)


# ----------------------------------------------------------------------------- writer


def test_extract_features_writes_shards_and_index(tmp_path, images, small_extractor):
    index = _extract(images, tmp_path / "f", small_extractor)

    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "index.parquet",
        "manifest.json",
        "train-00000.shard",
        "train-00001.shard",
        "val-00000.shard",
    ]
    assert index.dtypes.astype(str).to_dict() == {
        "image_id": "int64",
        "split": "object",
        "shard": "object",
        "row": "int64",
    }
    assert index["image_id"].tolist() == [2, 5, 9, 11, 17, 3, 40]  # by split, then id
    assert (
        index["shard"].tolist()
        == ["train-00000.shard"] * 3 + ["train-00001.shard"] * 2 + ["val-00000.shard"] * 2
    )
    assert index["row"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "f" / "index.parquet"), index)

    shard = read_shard(tmp_path / "f" / "train-00001.shard")
    assert shard.dtype == np.float16 and shard.shape == (2, 1, 2048)
    # The store holds what the model computes for each preprocessed image.
    paths = images.set_index("image_id").loc[[11, 17], "path"]
    batch = tf.stack([preprocess_image(Path(p).read_bytes(), SMALL) for p in paths])
    np.testing.assert_allclose(
        shard.astype(np.float32), small_extractor(batch).numpy(), rtol=2e-3, atol=1e-6
    )


def test_extraction_at_299_gives_64_locations(tmp_path, images):
    extractor = build_extractor("none", image_size=299, seed=0)
    assert extractor.output_shape == (None, 64, 2048)
    two = images[images["split"] == "val"]
    extract_features(two, tmp_path, extractor, batch_size=2, image_size=299, progress=False)
    shard = read_shard(tmp_path / "val-00000.shard")
    assert shard.shape == (2, 64, 2048) and shard.dtype == np.float16
    assert np.isfinite(shard).all() and shard.std() > 0
    assert 0.2 < (shard == 0).mean() < 0.8  # ReLU zeros: what makes the shards compact
    assert FeatureStore(tmp_path).feature_shape == (64, 2048)


def test_rerun_resumes_and_is_byte_identical(tmp_path, images, small_extractor):
    out = tmp_path / "f"
    _extract(images, out, small_extractor)
    reference = _files(out)
    first_mtime = (out / "train-00000.shard").stat().st_mtime_ns

    # A killed run: last shard and index missing, a temp file half written,
    # plus a shard left from a bigger image set.
    (out / "val-00000.shard").unlink()
    (out / "index.parquet").unlink()
    temporary_sibling(out / "val-00000.shard").write_bytes(b"partial")
    (out / "train-00007.shard").write_bytes((out / "train-00001.shard").read_bytes())

    _extract(images, out, small_extractor)
    assert _files(out) == reference
    assert (out / "train-00000.shard").stat().st_mtime_ns == first_mtime


def test_truncated_or_foreign_shards_are_redone(tmp_path, images, small_extractor):
    """The manifest vouches for a shard, but the file is cut short: it is rewritten."""
    out = tmp_path / "f"
    _extract(images, out, small_extractor)
    reference = _files(out)
    kept_mtime = (out / "train-00001.shard").stat().st_mtime_ns

    (out / "index.parquet").unlink()
    whole = (out / "train-00000.shard").read_bytes()
    (out / "train-00000.shard").write_bytes(whole[:-2])  # its last value lost
    (out / "val-00000.shard").write_bytes(whole[:20])  # cut inside the header
    with pytest.raises(ValueError, match="truncated"):
        read_shard(out / "train-00000.shard")

    _extract(images, out, small_extractor)
    assert _files(out) == reference
    assert (out / "train-00001.shard").stat().st_mtime_ns == kept_mtime  # the whole one is kept


def test_format_1_npy_store_is_refused_and_replaced(tmp_path, images, small_extractor):
    """A store of an older version (.npy shards) is refused by name; extraction rewrites it."""
    new = tmp_path / "new"
    index = _extract(images, new, small_extractor)
    old = tmp_path / "old"
    old.mkdir()
    for shard in index["shard"].unique():
        np.save(old / shard.replace(".shard", ".npy"), read_shard(new / shard))
    index.assign(shard=index["shard"].str.replace(".shard", ".npy")).to_parquet(
        old / "index.parquet", index=False
    )
    manifest = {"format": 1, "shards": {"train-00000.npy": "0" * 64}}
    (old / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ValueError, match=r"older format \(train-00000.npy.*features stage"):
        FeatureStore(old)
    _extract(images, old, small_extractor)
    assert _files(old) == _files(new)  # no .npy left, nothing reused from the old manifest


def test_changed_images_are_not_reused(tmp_path, images, small_extractor):
    other = _image_table(tmp_path / "other", IDS, seed=100)  # same ids and names, new pixels
    _extract(images, tmp_path / "reused", small_extractor)
    _extract(other, tmp_path / "reused", small_extractor)
    _extract(other, tmp_path / "fresh", small_extractor)
    assert _files(tmp_path / "reused") == _files(tmp_path / "fresh")


def test_duplicate_rows_are_merged_but_conflicts_fail(tmp_path, images, small_extractor):
    index = _extract(pd.concat([images, images]), tmp_path / "a", small_extractor)
    assert len(index) == len(images)
    clash = images.assign(split=["train"] * len(images))
    with pytest.raises(ValueError, match="more than one path or split"):
        _extract(pd.concat([images, clash]), tmp_path / "b", small_extractor)


# ----------------------------------------------------------------------------- parts


def _finish(images, out, extractor, **kwargs):
    """A whole-store run and extractor.json, as the features stage writes them."""
    index = _extract(images, out, extractor, **kwargs)
    write_extractor_spec(out, extractor, "none", SMALL, 0)
    return index


def _no_model(*args, **kwargs):
    raise AssertionError("the merge ran the model: it should have kept every part's shards")


def test_a_store_extracted_in_two_parts_equals_one_in_one_go(
    tmp_path, images, small_extractor, monkeypatch
):
    """Two hosts each extract a part into their own folder; one folder gets both and merges."""
    _finish(images, tmp_path / "whole", small_extractor)
    first, second = tmp_path / "host0", tmp_path / "host1"
    index0 = _extract(images, first, small_extractor, part=0, parts=2)
    index1 = _extract(images, second, small_extractor, part=1, parts=2)
    # Every other shard each, records of their own, no index: the store is not finished.
    assert sorted(p.name for p in first.iterdir()) == [
        "manifest.part-0-of-2.json",
        "train-00000.shard",
        "val-00000.shard",
    ]
    assert sorted(p.name for p in second.iterdir()) == [
        "manifest.part-1-of-2.json",
        "train-00001.shard",
    ]
    assert sorted(index0["image_id"].tolist() + index1["image_id"].tolist()) == [
        2,
        3,
        5,
        9,
        11,
        17,
        40,
    ]

    finished = _files(first)
    _extract(images, first, small_extractor, part=0, parts=2)  # a part run again resumes
    assert _files(first) == finished

    for path in second.iterdir():  # what rsync or a shared folder does between hosts
        (first / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(extraction_module, "_shard_features", _no_model)
    _finish(images, first, small_extractor)
    assert _files(first) == _files(tmp_path / "whole")  # shards, index, manifest, extractor.json


def test_a_merge_writes_what_no_part_finished(tmp_path, images, small_extractor):
    """Part 1 never ran and part 0's record withdraws a shard the old manifest vouched for."""
    out = tmp_path / "f"
    _finish(images, out, small_extractor)
    reference = _files(out)
    # Part 0 was killed while rewriting val-00000 (its record says so with null), after
    # the file had changed to a whole shard of the same shape: the old manifest vouches
    # for the name, and only the part's record can tell that the content is not it.
    (out / "val-00000.shard").write_bytes((out / "train-00001.shard").read_bytes())
    (out / "train-00001.shard").unlink()  # part 1's only shard, never written
    manifest = json.loads((out / "manifest.json").read_text())["shards"]
    record = {"format": 3, "part": 0, "parts": 2, "shards": {
        "train-00000.shard": manifest["train-00000.shard"], "val-00000.shard": None}}  # fmt: skip
    (out / "manifest.part-0-of-2.json").write_text(json.dumps(record))

    _finish(images, out, small_extractor)
    assert _files(out) == reference


def test_part_numbers_are_checked(tmp_path, images, small_extractor):
    for part, parts in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="part must be in"):
            _extract(images, tmp_path, small_extractor, part=part, parts=parts)


def _features_of(extractor: keras.Model, pixels: list[np.ndarray]) -> np.ndarray:
    """What the model computes for (h, w, 3) uint8 images: (n, L, C) float32."""
    return extractor(tf.stack([preprocess_pixels(p, SMALL) for p in pixels])).numpy()


def test_exif_rotated_jpeg_gives_the_upright_images_features(tmp_path, small_extractor):
    """A photo stored sideways with EXIF "rotate 90 degrees clockwise" is extracted upright."""
    rows, cols = np.mgrid[0:48, 0:64]
    upright = np.stack([rows * 5, cols * 4, (rows + cols) * 2], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must turn 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(np.rot90(upright)).save(path, "JPEG", quality=95, exif=exif)
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))  # (64, 48, 3): the pixels as stored, sideways
    shown = np.rot90(stored, k=-1)  # (48, 64, 3): turned the way the tag says
    assert np.abs(shown.astype(int) - upright).mean() < 3  # only JPEG's loss

    table = pd.DataFrame({"image_id": [1], "path": [str(path)], "split": ["train"]})
    _extract(table, tmp_path / "f", small_extractor)
    got = FeatureStore(tmp_path / "f").get([1]).astype(np.float32)  # (1, 1, 2048)
    np.testing.assert_allclose(got, _features_of(small_extractor, [shown]), rtol=2e-3, atol=1e-6)
    sideways = _features_of(small_extractor, [stored])
    assert not np.allclose(got, sideways, rtol=2e-3, atol=1e-6)


def test_webp_bmp_and_tiff_images_are_extracted(tmp_path, small_extractor):
    rows = []
    for image_id, fmt in enumerate(("WEBP", "BMP", "TIFF"), start=1):
        path = tmp_path / f"img_{image_id}.jpg"  # the content decides the format
        _write_image(path, (40 + image_id, 33), image_id, fmt)
        rows.append({"image_id": image_id, "path": str(path), "split": "train"})
    index = _extract(pd.DataFrame(rows), tmp_path / "f", small_extractor)
    assert index["image_id"].tolist() == [1, 2, 3]
    pixels = []
    for row, fmt in zip(rows, ("WEBP", "BMP", "TIFF"), strict=True):
        with Image.open(row["path"]) as image:
            assert image.format == fmt
            pixels.append(np.asarray(image.convert("RGB")))  # (h, w, 3) as Pillow reads it
    np.testing.assert_allclose(
        FeatureStore(tmp_path / "f").get([1, 2, 3]).astype(np.float32),
        _features_of(small_extractor, pixels),
        rtol=2e-3,
        atol=1e-6,
    )


def test_an_unreadable_image_fails_extraction_naming_it(tmp_path, images, small_extractor):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"no image in here")
    table = images.assign(path=[str(broken)] + images["path"].tolist()[1:])
    with pytest.raises(ValueError, match=r"broken\.jpg") as caught:
        _extract(table, tmp_path / "f", small_extractor)
    assert "not an image format" in str(caught.value)
    assert not (tmp_path / "f" / "index.parquet").exists()


@pytest.mark.slow
def test_killed_extraction_resumes_to_identical_output(tmp_path, images):
    images.to_parquet(tmp_path / "images.parquet")
    script = textwrap.dedent(
        f"""
        import pandas as pd
        from captioning.features import build_extractor, extract_features
        images = pd.read_parquet({str(tmp_path / "images.parquet")!r})
        extractor = build_extractor("none", image_size=299, seed=0)
        extract_features(images, {str(tmp_path / "killed")!r}, extractor,
                         batch_size=1, shard_size=1, image_size=299, progress=False)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "train-00000.shard"
    deadline = time.monotonic() + 120
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert first.exists(), "the child never wrote a shard"
    assert not (tmp_path / "killed" / "index.parquet").exists(), "killed too late to test resume"

    extractor = build_extractor("none", image_size=299, seed=0)
    options = {"batch_size": 1, "shard_size": 1, "image_size": 299, "progress": False}
    extract_features(images, tmp_path / "killed", extractor, **options)
    extract_features(images, tmp_path / "whole", extractor, **options)
    assert _files(tmp_path / "killed") == _files(tmp_path / "whole")


# ----------------------------------------------------------------------------- reader


@pytest.fixture(scope="module")
def store(tmp_path_factory, images, small_extractor) -> FeatureStore:
    out = tmp_path_factory.mktemp("store")
    _extract(images, out, small_extractor)
    return FeatureStore(out)


def test_store_get_returns_rows_in_the_order_asked(store):
    assert len(store) == 7 and store.feature_shape == (1, 2048) and store.splits == ["train", "val"]
    assert store.image_ids("val").tolist() == [3, 40]
    assert store.image_ids("train").tolist() == [2, 5, 9, 11, 17]
    shards = {name: read_shard(store.root / name) for name in store.index["shard"].unique()}
    every = {
        i: shards[shard][row]
        for i, shard, row in store.index[["image_id", "shard", "row"]].itertuples(index=False)
    }
    asked = [40, 2, 17, 3, 2]
    got = store.get(asked)
    assert got.dtype == np.float16 and got.shape == (5, 1, 2048)
    np.testing.assert_array_equal(got, np.stack([every[i] for i in asked]))
    assert store.get(np.array([], dtype=np.int64)).shape == (0, 1, 2048)
    with pytest.raises(KeyError, match="1234"):
        store.get([2, 1234])


def test_feature_stats_match_numpy(store):
    train = store.get(store.image_ids("train")).astype(np.float64).reshape(-1, 2048)
    mean, std = store.feature_stats("train")
    np.testing.assert_allclose(mean, train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, train.std(axis=0), rtol=1e-9)
    first_four = train[:4]  # spans two shards
    mean, std = store.feature_stats("train", max_images=4)
    np.testing.assert_allclose(mean, first_four.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, first_four.std(axis=0), rtol=1e-9)
    with pytest.raises(ValueError, match="no images"):
        store.feature_stats("test")


def test_store_get_reads_only_the_rows_asked_for(store, monkeypatch):
    """get touches the asked images' records in the mapped shard, never the rest of it."""
    code = store._shard_names.index("train-00000.shard")  # ids 2, 5, 9 at rows 0, 1, 2
    shard = store._shard(code)
    mapped, touched = shard.data, []

    class Recorder:  # stands in for the mapped file, noting every byte range read
        def __getitem__(self, key):
            assert isinstance(key, slice), f"read by {type(key).__name__}, not by byte range"
            touched.append((key.start, key.stop))
            return mapped[key]

    monkeypatch.setattr(shard, "data", Recorder())
    expected = np.stack([read_shard(store.root / "train-00000.shard")[2]] * 2)
    np.testing.assert_array_equal(_bits(store.get([9, 9])), _bits(expected))
    record = (shard.offsets[2], shard.offsets[3])
    assert touched and all(record[0] <= a <= b <= record[1] for a, b in touched), touched


def test_shard_round_trip_is_bit_identical(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    shape = (3, 7)  # 21 values: the mask's last byte is partial and padded
    relu = np.maximum(rng.normal(size=(4, *shape)), 0).astype(np.float16)  # about half zeros
    special = np.array(
        [0.0, -0.0, np.nan, np.inf, -np.inf, 6e-8, -6e-8, 65504, -1.5, 1.0, 0.0] + [2.0] * 10,
        np.float16,
    ).reshape(1, *shape)  # -0.0 and NaN are nonzero bit patterns: kept as they are
    original = np.concatenate(
        [
            np.zeros((1, *shape), np.float16),  # all zero: a mask and no values
            relu,
            rng.uniform(0.5, 2, (1, *shape)).astype(np.float16),  # no zeros at all
            special,
        ]
    )  # (7, 3, 7)
    write_shard(tmp_path / "s.shard", original)
    back = read_shard(tmp_path / "s.shard")
    assert back.dtype == np.float16 and back.shape == original.shape
    np.testing.assert_array_equal(_bits(back), _bits(original))

    # Rows out of order and repeated, over several decode blocks.
    monkeypatch.setattr(shard_module, "_DECODE_BLOCK", 3)
    rows = np.array([6, 0, 5, 5, 1, 3, 2, 4, 0, 6])
    got = shard_module.ShardReader(tmp_path / "s.shard").read(rows)
    np.testing.assert_array_equal(_bits(got), _bits(original[rows]))

    with pytest.raises(ValueError, match="float16"):
        write_shard(tmp_path / "f32.shard", original.astype(np.float32))
    assert not (tmp_path / "f32.shard").exists()


def test_store_is_at_most_half_of_float32(store):
    """Shards hold a bitmask and the nonzero values; every file counts in bytes_per_image."""
    files = sorted(p for p in store.root.iterdir() if p.is_file())
    assert bytes_per_image(store.root) == sum(p.stat().st_size for p in files) / 7
    for name, rows in store.index.groupby("shard")["row"]:
        stored = read_shard(store.root / name)  # (n, 1, 2048)
        n = len(rows)
        expected = 32 + 8 * (n + 1) + n * 2048 // 8 + 2 * np.count_nonzero(_bits(stored))
        assert (store.root / name).stat().st_size == expected, name
    zeros = np.mean(
        [(read_shard(store.root / n) == 0).mean() for n in store.index["shard"].unique()]
    )
    assert 0.3 < zeros < 0.7  # ReLU outputs: the test says something only if about half are zero
    float32_bytes = 2048 * 4
    assert bytes_per_image(store.root) <= float32_bytes / 2
