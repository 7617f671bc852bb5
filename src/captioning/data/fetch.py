"""One entry point that downloads a remote data source into the COCO 2014 layout.

The `download` stage calls `fetch_source` for the sources that live on the
internet (`coco2014`, `flickr8k`, `flickr30k`); `demo` and `local` are handled
elsewhere. It reads the `data:` params, keeps archives in a cache folder next to
(not inside) the layout, and returns the layout root. Everything it does is
idempotent: a completed source is not transferred or rewritten again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from captioning.data.coco import fetch_coco2014
from captioning.data.download_failures import RetryPolicy
from captioning.data.flickr import fetch_flickr, fetch_karpathy, write_coco_karpathy_splits

REMOTE_SOURCES = ("coco2014", "flickr8k", "flickr30k")


class RemoteDataParams(Protocol):
    """The fields of `captioning.config.DataParams` that fetching reads."""

    source: str
    seed: int
    base_url: str | None
    subset: int | None
    images_url: str | None
    karpathy_url: str | None
    download_workers: int
    download_retries: int


def fetch_source(
    params: RemoteDataParams,
    dest_root: str | Path,
    *,
    cache_dir: str | Path | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = True,
) -> Path:
    """Download `params.source` into `<dest_root>/<source>/` and return that folder.

    Archives go to `<cache_dir or dest_root/.downloads>/<source>/`. `retry`
    overrides the policy built from `params.download_retries` (tests use it for
    short backoff delays).
    """
    if params.source not in REMOTE_SOURCES:
        raise ValueError(
            f"fetch_source handles {list(REMOTE_SOURCES)}, not data.source={params.source!r}"
        )
    dest_root = Path(dest_root)
    root = dest_root / params.source
    cache = Path(cache_dir) if cache_dir is not None else dest_root / ".downloads"
    cache = cache / params.source
    retry = retry or RetryPolicy(retries=params.download_retries)
    if params.source == "coco2014":
        fetch_coco2014(
            root,
            cache,
            base_url=params.base_url,
            subset=params.subset,
            seed=params.seed,
            workers=params.download_workers,
            retry=retry,
            progress=progress,
        )
        # Karpathy's COCO split is optional here (split.scheme: karpathy needs it).
        if params.karpathy_url is not None:
            karpathy = fetch_karpathy(
                params.karpathy_url, cache, "coco", retry=retry, progress=progress
            )
            write_coco_karpathy_splits(karpathy, root)
        return root
    if params.subset is not None:
        raise ValueError(f"data.subset applies to coco2014 only, not {params.source}")
    return fetch_flickr(
        params.source,
        root,
        cache,
        images_url=params.images_url,
        karpathy_url=params.karpathy_url,
        retry=retry,
        progress=progress,
    )
