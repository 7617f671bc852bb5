"""COCO 2014 captions from the official archives (or a mirror), in full or as a subset.

`fetch_coco2014` produces the COCO 2014 layout of docs/design.md in one of two
ways. In full mode it downloads `zips/train2014.zip`, `zips/val2014.zip` and
`annotations/annotations_trainval2014.zip` from `base_url` (the official host by
default) and extracts them; on the official host each archive must also match
COCO's published size and md5, since a mirror may serve other files under the
same names. In subset mode it downloads only the annotations archive, picks N
images per split with a seeded draw, fetches just those images by their
`coco_url` (host swapped for `base_url` when one is set) on a bounded thread
pool, and writes caption files that list exactly those images. Transfers and
retries are `captioning.data.download`'s job, extraction `captioning.data.archives`'.
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from captioning.atomic_files import write_if_changed
from captioning.data.archives import CorruptArchiveError, fetch_archive
from captioning.data.coco_layout import prune_image_folder
from captioning.data.download import download, download_many
from captioning.data.download_failures import DownloadError, RetryPolicy

OFFICIAL_BASE_URL = "http://images.cocodataset.org"
SPLITS = ("train2014", "val2014")


@dataclass(frozen=True)
class CocoArchive:
    """One official archive: its path under the base URL and its published identity."""

    path: str
    size: int
    md5: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


# Sizes are the Content-Length the official host (an S3 bucket) reports; the md5s
# are the ones COCO tooling has verified these archives with since 2015 (for the
# single-part annotations upload the md5 is also the S3 ETag).
ANNOTATIONS = CocoArchive(
    "annotations/annotations_trainval2014.zip", 252_872_794, "0a379cfc70b0e71301e0f377548639bd"
)
IMAGE_ARCHIVES = {
    "train2014": CocoArchive(
        "zips/train2014.zip", 13_510_573_713, "0da8c0bd3d6becc4dcb32757491aca88"
    ),
    "val2014": CocoArchive("zips/val2014.zip", 6_645_013_297, "a3d79f5ed8d289b7a7554ce06a5782b3"),
}


def caption_member(split: str) -> str:
    """Path of a split's captions file inside the annotations archive (and the layout)."""
    return f"annotations/captions_{split}.json"


def is_official(base_url: str | None) -> bool:
    """Whether `base_url` is COCO's own host (None means it is)."""
    if base_url is None:
        return True
    return urlsplit(base_url).netloc.lower() == urlsplit(OFFICIAL_BASE_URL).netloc


def archive_url(base_url: str | None, archive: CocoArchive) -> str:
    """`<base>/<archive path>`, the official host when `base_url` is None."""
    return f"{(base_url or OFFICIAL_BASE_URL).rstrip('/')}/{archive.path}"


def image_url(coco_url: str, base_url: str | None) -> str:
    """An image's `coco_url` with scheme and host replaced by `base_url` when set."""
    if base_url is None:
        return coco_url
    return base_url.rstrip("/") + urlsplit(coco_url).path


def choose_subset(captions: dict[str, Any], n: int, seed: int, split: str) -> dict[str, Any]:
    """`captions` reduced to `n` images with captions, drawn by a seeded sample.

    The draw depends only on (seed, split, the sorted image ids), so every run and
    every machine picks the same images. The result keeps the COCO schema.
    """
    captioned = {a["image_id"] for a in captions["annotations"]}
    ids = sorted(img["id"] for img in captions["images"] if img["id"] in captioned)
    rng = random.Random(f"coco2014:{split}:{seed}")
    chosen = set(rng.sample(ids, min(n, len(ids))))
    subset = {k: v for k, v in captions.items() if k not in ("images", "annotations")}
    subset["images"] = sorted(
        (img for img in captions["images"] if img["id"] in chosen), key=lambda img: img["id"]
    )
    subset["annotations"] = sorted(
        (a for a in captions["annotations"] if a["image_id"] in chosen), key=lambda a: a["id"]
    )
    return subset


def fetch_coco2014(
    root: str | Path,
    cache_dir: str | Path,
    *,
    base_url: str | None = None,
    subset: int | None = None,
    seed: int = 2014,
    workers: int = 8,
    retry: RetryPolicy | None = None,
    progress: bool = True,
) -> Path:
    """Build the COCO 2014 layout in `root`; archives are kept in `cache_dir`.

    `subset=None` fetches everything (about 20 GB); `subset=N` fetches N images
    per split. Re-running with the same arguments transfers and writes nothing.
    """
    root, cache_dir = Path(root), Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    if subset is None:
        _fetch_full(root, cache_dir, base_url, retry, progress)
    else:
        if subset < 1:
            raise ValueError(f"data.subset must be a positive number of images, got {subset}")
        _fetch_subset(root, cache_dir, base_url, subset, seed, workers, retry, progress)
    return root


def _fetch_full(root, cache_dir, base_url, retry, progress) -> None:
    official = is_official(base_url)
    captions = {caption_member(split) for split in SPLITS}
    # Only the caption files of the annotations archive belong to the layout; the
    # instance and keypoint files would add ~400 MB nobody reads.
    plan = [(ANNOTATIONS, lambda name: name in captions, False)]
    # The image archives are deleted once extracted: keeping them doubles 20 GB.
    plan += [(IMAGE_ARCHIVES[split], None, True) for split in SPLITS]
    for archive, include, remove in plan:
        fetch_archive(
            archive_url(base_url, archive),
            cache_dir / archive.name,
            root,
            include=include,
            expected_size=archive.size if official else None,
            checksum=f"md5:{archive.md5}" if official else None,
            retry=retry,
            remove_archive=remove,
            progress=progress,
        )


def _read_captions(annotations_zip: Path, url: str) -> dict[str, dict[str, Any]]:
    try:
        with zipfile.ZipFile(annotations_zip) as zf:
            return {split: json.loads(zf.read(caption_member(split))) for split in SPLITS}
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        annotations_zip.unlink(missing_ok=True)
        raise CorruptArchiveError(
            url,
            f"the annotations archive is damaged or lacks the caption files ({err})",
            "it was deleted; re-run to download it again, and check data.base_url if it repeats",
        ) from err


def _fetch_subset(root, cache_dir, base_url, n, seed, workers, retry, progress) -> None:
    official = is_official(base_url)
    url = archive_url(base_url, ANNOTATIONS)
    annotations_zip = download(
        url,
        cache_dir / ANNOTATIONS.name,
        expected_size=ANNOTATIONS.size if official else None,
        checksum=f"md5:{ANNOTATIONS.md5}" if official else None,
        retry=retry,
        progress=progress,
    )
    # A full download into this root would otherwise be trusted by its markers
    # after this run replaces its captions and prunes its images.
    for archive in (ANNOTATIONS, *IMAGE_ARCHIVES.values()):
        (root / f".{archive.name}.extracted").unlink(missing_ok=True)
    for split, captions in _read_captions(annotations_zip, url).items():
        chosen = choose_subset(captions, n, seed, split)
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        wanted = {_safe_file_name(img["file_name"], url): img for img in chosen["images"]}
        jobs = [
            (image_url(img["coco_url"], base_url), folder / name)
            for name, img in wanted.items()
            if not (folder / name).exists()
        ]
        download_many(jobs, workers=workers, retry=retry, progress=progress, desc=split)
        prune_image_folder(folder, set(wanted))
        write_if_changed(root / caption_member(split), json.dumps(chosen, separators=(",", ":")))


def _safe_file_name(name: str, url: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise DownloadError(
            url,
            f"the annotations name an image file {name!r} that is not a plain file name",
            "the annotations archive is not COCO's; check data.base_url",
        )
    return name
