"""Flickr8k / Flickr30k with Karpathy's captions, converted to the COCO 2014 layout.

Both data sets come as an image archive (zip or tar) plus Karpathy's caption
file (`dataset_flickr8k.json`: images with `filename`, `split` and
`sentences[].raw`), either bare or inside his `caption_datasets.zip`.
`fetch_flickr` downloads both through `captioning.data.download` and rewrites
them as docs/design.md's layout: Karpathy-train (and restval) images go to
`train2014/`, val and test images to `val2014/`, renamed
`COCO_<folder>_<12-digit id>.jpg` with id = Karpathy `imgid` + 1 (COCO ids
start at 1), and `splits.json` at the root records each image's Karpathy split
so that `split.scheme: karpathy` reproduces it exactly.
`write_coco_karpathy_splits` writes the same file for COCO from
`dataset_coco.json`.
"""

from __future__ import annotations

import json
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from tqdm import tqdm

from captioning.atomic_files import write_if_changed
from captioning.data.archives import CorruptArchiveError
from captioning.data.coco_layout import prune_image_folder
from captioning.data.download import download
from captioning.data.download_failures import DownloadError, RetryPolicy
from captioning.data.images import ImageReadError, image_size

FLICKR8K_IMAGES_URL = (
    "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"
)
KARPATHY_CAPTIONS_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
# Flickr30k is handed out on request only, so it has no default image URL.
DEFAULT_IMAGES_URL = {"flickr8k": FLICKR8K_IMAGES_URL, "flickr30k": None}
SPLITS_FILE = "splits.json"
CONVERTED_MARKER = ".flickr.converted"


def folder_for(karpathy_split: str) -> str:
    """The COCO image folder of a Karpathy split: train/restval -> train2014, else val2014."""
    return "train2014" if karpathy_split in ("train", "restval") else "val2014"


def cache_name(url: str, fallback: str) -> str:
    """The file name a download of `url` is cached under (last path segment)."""
    name = PurePosixPath(urlsplit(url).path).name
    return name or fallback


def load_karpathy(path: str | Path, dataset: str, url: str | None = None) -> dict[str, Any]:
    """Karpathy's `dataset_<dataset>.json`, read from the file or from a zip holding it."""
    path = Path(path)
    wanted = f"dataset_{dataset}.json"
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if PurePosixPath(n).name == wanted]
                if not names:
                    raise DownloadError(
                        url or str(path),
                        f"the caption archive has no {wanted}",
                        "point data.karpathy_url at Karpathy's caption_datasets.zip or at "
                        f"{wanted} itself",
                    )
                data = json.loads(zf.read(names[0]))
        else:
            data = json.loads(path.read_bytes())
    except (zipfile.BadZipFile, zlib.error, ValueError) as err:
        path.unlink(missing_ok=True)
        raise CorruptArchiveError(
            url or str(path),
            f"the Karpathy caption file is damaged or not JSON ({err})",
            "it was deleted; re-run to download it again, and check data.karpathy_url",
        ) from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DownloadError(
            url or str(path),
            "this is not a Karpathy caption file (no 'images' list)",
            f"point data.karpathy_url at {wanted} or caption_datasets.zip",
        )
    return data


def fetch_karpathy(
    url: str | None,
    cache_dir: str | Path,
    dataset: str,
    *,
    retry: RetryPolicy | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Download (once) and read the Karpathy caption file for `dataset`."""
    url = url or KARPATHY_CAPTIONS_URL
    path = download(
        url,
        Path(cache_dir) / cache_name(url, "karpathy.json"),
        retry=retry,
        progress=progress,
    )
    return load_karpathy(path, dataset, url)


def _archive_files(archive: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(base name, stream) of each regular file, in archive order (tar.gz reads once)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as fh:
                        yield PurePosixPath(info.filename).name, fh
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                # Links are skipped, not followed: only real files carry images.
                if member.isfile():
                    fh = tf.extractfile(member)
                    if fh is not None:
                        yield PurePosixPath(member.name).name, fh
    else:
        raise zipfile.BadZipFile("neither a zip nor a tar archive")


def _image_size(data: bytes, name: str) -> dict[str, int]:
    """{"width", "height"} from the image header, or {} when it does not parse."""
    try:
        _, width, height = image_size(data, name)
    except ImageReadError:
        # An unreadable image is the validate stage's to quarantine and count;
        # width/height are optional in the COCO schema.
        return {}
    return {"width": width, "height": height}


def convert_flickr(
    images_archive: str | Path,
    karpathy: dict[str, Any],
    root: str | Path,
    *,
    dataset: str,
    images_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the COCO layout for `dataset` into `root` from its archive and Karpathy file."""
    archive, root = Path(images_archive), Path(root)
    # Flickr file name -> (COCO-style image id, layout folder, Karpathy record)
    entries = {}
    for position, img in enumerate(karpathy["images"]):
        image_id = int(img.get("imgid", position)) + 1
        entries[img["filename"]] = (image_id, folder_for(img["split"]), img)
    records = _copy_images(archive, entries, root, dataset, images_url, progress)
    for folder, images in records.items():
        prune_image_folder(root / folder, {r["file_name"] for r in images})
        images.sort(key=lambda r: r["id"])
        write_if_changed(
            root / "annotations" / f"captions_{folder}.json",
            json.dumps(_caption_file(images, entries, dataset, images_url), separators=(",", ":")),
        )
    splits = {
        str(image_id): img["split"]
        for image_id, _, img in sorted(entries.values(), key=lambda e: e[0])
    }
    write_if_changed(root / SPLITS_FILE, json.dumps(splits, indent=0) + "\n")
    return root


def _copy_images(
    archive: Path,
    entries: dict[str, tuple[int, str, dict]],
    root: Path,
    dataset: str,
    images_url: str | None,
    progress: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Write every image the Karpathy file names under its COCO name; folder -> image records."""
    records: dict[str, list[dict[str, Any]]] = {"train2014": [], "val2014": []}
    found: set[str] = set()
    try:
        files = _archive_files(archive)
        for name, fh in tqdm(files, desc=f"convert {dataset}", unit="file", disable=not progress):
            # __MACOSX/._name resource forks share the base name but are not images.
            if name not in entries or name in found or name.startswith("._"):
                continue
            data = fh.read()
            image_id, folder, _ = entries[name]
            file_name = f"COCO_{folder}_{image_id:012d}.jpg"
            write_if_changed(root / folder / file_name, data)
            record = {"id": image_id, "file_name": file_name, "flickr_file_name": name}
            record.update(_image_size(data, name))
            records[folder].append(record)
            found.add(name)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # the disk, not the archive
        archive.unlink(missing_ok=True)
        raise CorruptArchiveError(
            images_url or str(archive),
            f"the image archive is damaged ({type(err).__name__}: {err})",
            "it was deleted; re-run to download it again, and check data.images_url if it repeats",
        ) from err
    missing = sorted(set(entries) - found)
    if missing:
        raise DownloadError(
            images_url or str(archive),
            f"{len(missing)} images named in the Karpathy file are not in the archive "
            f"(e.g. {missing[:3]})",
            f"check that data.images_url and data.karpathy_url are both for {dataset}",
        )
    return records


def _caption_file(
    images: list[dict[str, Any]],
    entries: dict[str, tuple[int, str, dict]],
    dataset: str,
    images_url: str | None,
) -> dict[str, Any]:
    """A COCO captions file for one folder's image records, with Karpathy's sentences."""
    annotations = []
    for record in images:
        img = entries[record["flickr_file_name"]][2]
        sentids = img.get("sentids") or []
        for k, sentence in enumerate(img["sentences"]):
            sent_id = sentence.get("sentid", sentids[k] if k < len(sentids) else None)
            annotations.append(
                {
                    "image_id": record["id"],
                    # Ids must be unique across both files; Karpathy's sentid is.
                    "id": (sent_id + 1) if sent_id is not None else len(annotations) + 1,
                    "caption": sentence["raw"],
                }
            )
    return {
        "info": {
            "description": f"{dataset} (Karpathy split) in the COCO 2014 layout",
            "url": images_url or "",
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }


def write_coco_karpathy_splits(karpathy: dict[str, Any], root: str | Path) -> Path:
    """Write `<root>/splits.json` (cocoid -> Karpathy split) from `dataset_coco.json`.

    Only images listed in the root's caption files are kept, so a subset
    download gets a splits file that matches it.
    """
    root = Path(root)
    present: set[int] | None = None
    for folder in ("train2014", "val2014"):
        path = root / "annotations" / f"captions_{folder}.json"
        if path.exists():
            present = present or set()
            present.update(img["id"] for img in json.loads(path.read_bytes())["images"])
    splits = {
        str(img["cocoid"]): img["split"]
        for img in sorted(karpathy["images"], key=lambda img: img["cocoid"])
        if present is None or img["cocoid"] in present
    }
    path = root / SPLITS_FILE
    write_if_changed(path, json.dumps(splits, indent=0) + "\n")
    return path


def fetch_flickr(
    dataset: str,
    root: str | Path,
    cache_dir: str | Path,
    *,
    images_url: str | None = None,
    karpathy_url: str | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = True,
) -> Path:
    """Build `dataset`'s COCO layout in `root`; downloads are kept in `cache_dir`.

    The image archive is deleted after conversion (it duplicates the images);
    a marker in `root` makes a re-run with the same URLs touch nothing.
    """
    if dataset not in DEFAULT_IMAGES_URL:
        raise ValueError(
            f"unknown Flickr data set {dataset!r}; expected {list(DEFAULT_IMAGES_URL)}"
        )
    images_url = images_url or DEFAULT_IMAGES_URL[dataset]
    if images_url is None:
        raise ValueError(
            f"data.images_url is required for {dataset}: the images are distributed on "
            "request (https://shannon.cs.illinois.edu/DenotationGraph/); point it at your "
            "copy of the image archive (zip or tar.gz), e.g. on a local mirror"
        )
    karpathy_url = karpathy_url or KARPATHY_CAPTIONS_URL
    root, cache_dir = Path(root), Path(cache_dir)
    marker = root / CONVERTED_MARKER
    recipe = json.dumps(
        {"dataset": dataset, "images_url": images_url, "karpathy_url": karpathy_url}, indent=1
    )
    if marker.exists() and marker.read_text(encoding="utf-8") == recipe:
        return root
    karpathy = fetch_karpathy(karpathy_url, cache_dir, dataset, retry=retry, progress=progress)
    archive = download(
        images_url,
        cache_dir / cache_name(images_url, f"{dataset}-images"),
        retry=retry,
        progress=progress,
    )
    convert_flickr(
        archive, karpathy, root, dataset=dataset, images_url=images_url, progress=progress
    )
    write_if_changed(marker, recipe)
    archive.unlink(missing_ok=True)
    return root
