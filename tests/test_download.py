"""Downloads against a real, faulty HTTP mirror on 127.0.0.1 with real archives.

Covers the generic transfer (resume, restart on 200, retries, verification,
clear errors), safe extraction, and the coco2014 / flickr sources end to end
through `fetch_source`, including that a second run transfers and writes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import zipfile
from pathlib import Path

import pytest

from captioning.config import DataParams
from captioning.data import coco
from captioning.data.archives import (
    CorruptArchiveError,
    UnsafeArchiveError,
    extract_archive,
    fetch_archive,
)
from captioning.data.download import download
from captioning.data.download_failures import DownloadError, RetryPolicy
from captioning.data.fetch import fetch_source
from mirror import (
    Mirror,
    build_coco_mirror,
    build_escaping_archives,
    build_flickr_mirror,
    member_data_offset,
)

FAST = RetryPolicy(retries=3, backoff_s=0.001, connect_timeout_s=5, read_timeout_s=5)
BLOB_SIZE = 300_000


@pytest.fixture
def site(tmp_path):
    """An empty mirror folder and its running server."""
    folder = tmp_path / "site"
    folder.mkdir()
    with Mirror(folder) as mirror:
        yield mirror


@pytest.fixture
def blob(site):
    """A 300 kB random file on the mirror: (url path, bytes)."""
    data = random.Random(5).randbytes(BLOB_SIZE)
    (site.folder / "blob.bin").write_bytes(data)
    return "/blob.bin", data


@pytest.fixture(scope="module")
def coco_site(tmp_path_factory):
    """A COCO 2014 mirror (24 train + 12 val images), shared by the module."""
    folder = tmp_path_factory.mktemp("coco-site")
    fixture = build_coco_mirror(folder)
    with Mirror(folder) as mirror:
        yield mirror, fixture


@pytest.fixture
def coco_mirror(coco_site):
    mirror, fixture = coco_site
    mirror.reset_log()
    yield mirror, fixture
    mirror.cut_after.clear()
    mirror.fail.clear()
    mirror.corrupt.clear()
    mirror.missing.clear()
    mirror.ignore_range.clear()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime, to prove nothing was touched."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def params(**overrides) -> DataParams:
    return dataclasses.replace(DataParams(), **overrides)


# ------------------------------------------------------------ single transfers


def test_interrupted_transfer_resumes_from_where_it_stopped(site, blob, tmp_path):
    path, data = blob
    site.cut_after[path] = 100_000
    dest = download(site.url + path, tmp_path / "out.bin", retry=FAST, progress=False)
    assert dest.read_bytes() == data
    assert not dest.with_name("out.bin.part").exists()
    # The server sent every byte exactly once: the retry asked for the rest only.
    assert site.bytes_sent[path] == BLOB_SIZE
    assert [(r.range, r.status) for r in site.requests] == [
        (None, 200),
        ("bytes=100000-", 206),
    ]


def test_part_file_left_by_an_earlier_run_is_resumed(site, blob, tmp_path):
    path, data = blob
    (tmp_path / "out.bin.part").write_bytes(data[:123_456])
    dest = download(
        site.url + path,
        tmp_path / "out.bin",
        checksum="sha256:" + hashlib.sha256(data).hexdigest(),
        retry=FAST,
        progress=False,
    )
    assert dest.read_bytes() == data
    assert site.bytes_sent[path] == BLOB_SIZE - 123_456


def test_a_complete_part_file_is_verified_and_renamed(site, blob, tmp_path):
    path, data = blob
    (tmp_path / "out.bin.part").write_bytes(data)  # e.g. killed just before the rename
    dest = download(site.url + path, tmp_path / "out.bin", retry=FAST, progress=False)
    assert dest.read_bytes() == data
    assert [(r.range, r.status) for r in site.requests] == [(f"bytes={BLOB_SIZE}-", 416)]
    assert site.bytes_sent[path] == 0


def test_server_ignoring_range_restarts_the_file_instead_of_appending(site, blob, tmp_path):
    path, data = blob
    site.ignore_range.add(path)
    (tmp_path / "out.bin.part").write_bytes(b"x" * 50_000)  # stale bytes
    dest = download(site.url + path, tmp_path / "out.bin", retry=FAST, progress=False)
    assert dest.read_bytes() == data
    assert [(r.range, r.status) for r in site.requests] == [("bytes=50000-", 200)]


def test_server_errors_are_retried_with_backoff(site, blob, tmp_path):
    path, data = blob
    site.fail[path] = 2
    dest = download(site.url + path, tmp_path / "out.bin", retry=FAST, progress=False)
    assert dest.read_bytes() == data
    assert [r.status for r in site.requests] == [500, 500, 200]


def test_persistent_server_errors_give_up_naming_the_url(site, blob, tmp_path):
    path, _ = blob
    site.fail[path] = 100
    with pytest.raises(DownloadError) as err:
        download(site.url + path, tmp_path / "out.bin", retry=FAST, progress=False)
    assert site.url + path in str(err.value)
    assert "What to do" in str(err.value)
    assert len(site.requests) == FAST.retries + 1
    assert not (tmp_path / "out.bin").exists()


def test_404_stops_at_once_with_the_url_and_advice(site, tmp_path):
    with pytest.raises(DownloadError) as err:
        download(site.url + "/zips/nope.zip", tmp_path / "nope.zip", retry=FAST, progress=False)
    message = str(err.value)
    assert "404" in message and site.url + "/zips/nope.zip" in message
    assert "data.base_url" in message
    assert len(site.requests) == 1  # a 404 is not retried


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_a_corrupted_byte_fails_the_checksum(site, blob, tmp_path, algorithm):
    path, data = blob
    site.corrupt[path] = 200_000
    checksum = f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()
    with pytest.raises(DownloadError) as err:
        download(site.url + path, tmp_path / "out.bin", checksum=checksum, progress=False)
    assert "checksum mismatch" in str(err.value) and site.url + path in str(err.value)
    # Neither the bad file nor a .part to resume from is left behind.
    assert list(tmp_path.iterdir()) == [tmp_path / "site"]


def test_size_other_than_the_published_one_is_refused(site, blob, tmp_path):
    path, _ = blob
    with pytest.raises(DownloadError, match="published size"):
        download(
            site.url + path,
            tmp_path / "out.bin",
            expected_size=BLOB_SIZE + 1,
            retry=FAST,
            progress=False,
        )


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "tar-symlink"])
def test_archive_members_escaping_the_target_are_refused(tmp_path, kind):
    archive = build_escaping_archives(tmp_path / "archives")[kind]
    target = tmp_path / "out" / "root"
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, target, progress=False)
    # Refused before anything was written, inside or outside the target.
    assert not target.exists() or list(target.iterdir()) == []
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_extraction_runs_once(tmp_path, coco_mirror):
    mirror, fixture = coco_mirror
    archive = mirror.folder / "zips" / "val2014.zip"
    target = tmp_path / "root"
    extract_archive(archive, target, progress=False)
    assert sorted(p.name for p in (target / "val2014").iterdir()) == sorted(
        fixture.images["val2014"]
    )
    before = snapshot(target)
    extract_archive(tmp_path / "val2014.zip", target, progress=False)  # archive gone: marker
    assert snapshot(target) == before


def test_a_damaged_zip_is_caught_at_extraction_and_deleted(coco_mirror, tmp_path):
    mirror, fixture = coco_mirror
    archive = mirror.folder / "zips" / "val2014.zip"
    member = "val2014/" + sorted(fixture.images["val2014"])[3]
    mirror.corrupt["/zips/val2014.zip"] = member_data_offset(archive, member) + 100
    url = mirror.url + "/zips/val2014.zip"
    with pytest.raises(CorruptArchiveError) as err:
        fetch_archive(url, tmp_path / "val2014.zip", tmp_path / "root", retry=FAST, progress=False)
    assert url in str(err.value)
    assert not (tmp_path / "val2014.zip").exists()  # so a re-run downloads it afresh


# ------------------------------------------------------------------- coco2014


def test_full_coco2014_download_builds_the_layout(coco_mirror, tmp_path):
    mirror, fixture = coco_mirror
    train_zip = mirror.folder / "zips" / "train2014.zip"
    mirror.cut_after["/zips/train2014.zip"] = train_zip.stat().st_size // 2
    mirror.fail["/zips/val2014.zip"] = 1
    root = fetch_source(
        params(source="coco2014", base_url=mirror.url), tmp_path / "raw", retry=FAST, progress=False
    )
    assert root == tmp_path / "raw" / "coco2014"
    for split in coco.SPLITS:
        for name, data in fixture.images[split].items():
            assert (root / split / name).read_bytes() == data
        assert len(list((root / split).iterdir())) == len(fixture.images[split])
        on_disk = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
        assert on_disk == fixture.captions[split]
    # Only the caption files of the annotations archive belong to the layout.
    assert sorted(p.name for p in (root / "annotations").iterdir()) == [
        "captions_train2014.json",
        "captions_val2014.json",
    ]
    # The interrupted archive was resumed, not sent again.
    assert mirror.bytes_sent["/zips/train2014.zip"] == train_zip.stat().st_size
    cache = tmp_path / "raw" / ".downloads" / "coco2014"
    assert sorted(p.name for p in cache.iterdir()) == ["annotations_trainval2014.zip"]

    mirror.reset_log()
    before = snapshot(tmp_path / "raw")
    assert fetch_source(params(source="coco2014", base_url=mirror.url), tmp_path / "raw") == root
    assert mirror.requests == []
    assert snapshot(tmp_path / "raw") == before


def test_coco2014_subset_fetches_only_the_chosen_images(coco_mirror, tmp_path):
    mirror, fixture = coco_mirror
    p = params(source="coco2014", base_url=mirror.url + "/", subset=5, seed=3)
    root = fetch_source(p, tmp_path / "raw", retry=FAST, progress=False)
    requested = mirror.paths_requested()
    assert requested.count("/annotations/annotations_trainval2014.zip") == 1
    assert not any(path.startswith("/zips/") for path in requested)
    for split in coco.SPLITS:
        chosen = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
        assert chosen == coco.choose_subset(fixture.captions[split], 5, 3, split)
        names = sorted(img["file_name"] for img in chosen["images"])
        assert len(names) == 5
        assert sorted(p.name for p in (root / split).iterdir()) == names
        assert {a["image_id"] for a in chosen["annotations"]} == {i["id"] for i in chosen["images"]}
        assert sorted(f"/{split}/{name}" for name in names) == sorted(
            path for path in requested if path.startswith(f"/{split}/")
        )
    # Deterministic in the seed; another seed draws other images.
    other = coco.choose_subset(fixture.captions["train2014"], 5, 4, "train2014")
    assert other != coco.choose_subset(fixture.captions["train2014"], 5, 3, "train2014")

    mirror.reset_log()
    before = snapshot(tmp_path / "raw")
    fetch_source(p, tmp_path / "raw", retry=FAST, progress=False)
    assert mirror.requests == []
    assert snapshot(tmp_path / "raw") == before

    # A smaller subset prunes the images it no longer lists.
    fetch_source(dataclasses.replace(p, subset=2), tmp_path / "raw", retry=FAST, progress=False)
    assert len(list((root / "train2014").iterdir())) == 2


def test_coco2014_subset_stops_on_a_missing_image(coco_mirror, tmp_path):
    mirror, fixture = coco_mirror
    chosen = coco.choose_subset(fixture.captions["val2014"], 3, 2014, "val2014")
    missing = f"/val2014/{chosen['images'][0]['file_name']}"
    mirror.missing.add(missing)
    with pytest.raises(DownloadError) as err:
        fetch_source(
            params(source="coco2014", base_url=mirror.url, subset=3),
            tmp_path / "raw",
            retry=FAST,
            progress=False,
        )
    assert mirror.url + missing in str(err.value)


def test_coco_urls_follow_the_official_host_or_the_mirror():
    assert coco.archive_url(None, coco.ANNOTATIONS) == (
        "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"
    )
    assert coco.is_official(None) and coco.is_official("https://images.cocodataset.org/")
    assert not coco.is_official("http://127.0.0.1:8000")
    url = "http://images.cocodataset.org/val2014/COCO_val2014_000000000042.jpg"
    assert coco.image_url(url, None) == url
    assert coco.image_url(url, "http://127.0.0.1:9/m/") == (
        "http://127.0.0.1:9/m/val2014/COCO_val2014_000000000042.jpg"
    )


def test_coco2014_karpathy_splits_cover_the_downloaded_images(coco_mirror, tmp_path):
    mirror, fixture = coco_mirror
    images = fixture.captions["train2014"]["images"] + fixture.captions["val2014"]["images"]
    karpathy = {
        "dataset": "coco",
        "images": [
            {"cocoid": img["id"], "split": ["train", "restval", "val", "test"][i % 4]}
            for i, img in enumerate(images)
        ],
    }
    with zipfile.ZipFile(mirror.folder / "caption_datasets.zip", "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps(karpathy))
    p = params(
        source="coco2014",
        base_url=mirror.url,
        subset=4,
        karpathy_url=mirror.url + "/caption_datasets.zip",
    )
    root = fetch_source(p, tmp_path / "raw", retry=FAST, progress=False)
    splits = json.loads((root / "splits.json").read_text())
    downloaded = {
        img["id"]
        for split in coco.SPLITS
        for img in json.loads((root / "annotations" / f"captions_{split}.json").read_text())[
            "images"
        ]
    }
    assert {int(k) for k in splits} == downloaded
    expected = {str(e["cocoid"]): e["split"] for e in karpathy["images"]}
    assert all(expected[k] == v for k, v in splits.items())


# ---------------------------------------------------------------------- flickr


@pytest.mark.parametrize("dataset", ["flickr8k", "flickr30k"])
def test_flickr_becomes_the_coco_layout_with_karpathy_splits(site, tmp_path, dataset):
    karpathy, files = build_flickr_mirror(site.folder, dataset)
    if dataset == "flickr8k":
        urls = {"images_url": "/Flickr8k_Dataset.zip", "karpathy_url": "/caption_datasets.zip"}
    else:
        urls = {
            "images_url": "/flickr30k-images.tar.gz",
            "karpathy_url": "/dataset_flickr30k.json",
        }
    p = params(source=dataset, **{k: site.url + v for k, v in urls.items()})
    root = fetch_source(p, tmp_path / "raw", retry=FAST, progress=False)

    splits = json.loads((root / "splits.json").read_text())
    assert splits == {str(img["imgid"] + 1): img["split"] for img in karpathy["images"]}
    by_id = {img["imgid"] + 1: img for img in karpathy["images"]}
    for folder, wanted in (("train2014", {"train"}), ("val2014", {"val", "test"})):
        captions = json.loads((root / "annotations" / f"captions_{folder}.json").read_text())
        ids = {img["id"] for img in captions["images"]}
        assert ids == {i for i, img in by_id.items() if img["split"] in wanted}
        assert sorted(os.listdir(root / folder)) == sorted(
            f"COCO_{folder}_{i:012d}.jpg" for i in ids
        )
        for record in captions["images"]:
            source = by_id[record["id"]]
            assert (root / folder / record["file_name"]).read_bytes() == files[source["filename"]]
            assert record["width"] >= 32 and record["height"] >= 24
        for ann in captions["annotations"]:
            raws = [s["raw"] for s in by_id[ann["image_id"]]["sentences"]]
            assert ann["caption"] in raws
        assert len(captions["annotations"]) == 5 * len(ids)

    site.reset_log()
    before = snapshot(tmp_path / "raw")
    fetch_source(p, tmp_path / "raw", retry=FAST, progress=False)
    assert site.requests == []
    assert snapshot(tmp_path / "raw") == before


def test_flickr30k_needs_an_images_url(tmp_path):
    with pytest.raises(ValueError, match="data.images_url"):
        fetch_source(params(source="flickr30k"), tmp_path / "raw", progress=False)
