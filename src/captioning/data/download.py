"""Resumable, verified HTTP downloads: the one way this project fetches a file.

Every transfer (the data sources in `captioning.data.coco` and
`captioning.data.flickr`, the extractor's ImageNet weights) goes through
`download` or `download_many`, so all behave alike: a file is streamed to
`<name>.part` with a progress bar, resumed with an HTTP Range request after an
interruption (a server that ignores Range and answers 200 restarts the file
cleanly), checked against the server's Content-Length, an expected size and a
checksum where one is known (one such attempt is `captioning.data.transfer`'s
`fetch_once`), retried with exponential backoff on connection errors and 5xx
answers (`captioning.data.download_failures`), and only then moved into place,
synced to disk. A final
file therefore always means a verified file, which is what lets a second run
skip it. Unpacking archives is `captioning.data.archives`' job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import requests
from tqdm import tqdm

from captioning.atomic_files import atomic_path
from captioning.data.download_failures import DownloadError, Retryable, RetryPolicy
from captioning.data.transfer import fetch_once

log = logging.getLogger(__name__)


def download(
    url: str,
    dest: str | Path,
    *,
    expected_size: int | None = None,
    checksum: str | None = None,
    retry: RetryPolicy | None = None,
    session: requests.Session | None = None,
    progress: bool = True,
) -> Path:
    """Fetch `url` to `dest` unless `dest` already exists; return `dest`.

    `checksum` is `"md5:<hex>"` or `"sha256:<hex>"`. Raises `DownloadError` on a
    404/403, a size or checksum mismatch, or when the retries run out (the
    `.part` file is kept then, so the next run resumes).
    """
    dest = Path(dest)
    if _already_downloaded(dest, expected_size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    try:
        _fetch_with_retries(
            url, part, session, expected_size, checksum, retry or RetryPolicy(), progress
        )
    finally:
        if own_session:
            session.close()
    _move_into_place(part, dest)
    return dest


def _already_downloaded(dest: Path, expected_size: int | None) -> bool:
    """Whether `dest` is a finished download; one of the wrong size is deleted."""
    if not dest.exists():
        return False
    # A file reaches `dest` only after verification, so an existing one is complete;
    # an expected size that disagrees means it came from another host.
    size = dest.stat().st_size
    if expected_size is None or size == expected_size:
        return True
    log.warning("%s has %d bytes, expected %d: downloading again", dest, size, expected_size)
    dest.unlink()
    return False


def _fetch_with_retries(
    url: str,
    part: Path,
    session: requests.Session,
    expected_size: int | None,
    checksum: str | None,
    retry: RetryPolicy,
    progress: bool,
) -> None:
    """Repeat `fetch_once` until `part` is complete and verified, or the retries run out."""
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            fetch_once(url, part, session, expected_size, checksum, retry, progress)
            return
        except Retryable as err:
            after = part.stat().st_size if part.exists() else 0
            # A cut that still delivered bytes is progress, not a failure; only
            # attempts that got nothing count against the retry budget.
            failures = 0 if after > before else failures + 1
            if failures > retry.retries:
                raise DownloadError(
                    url,
                    f"giving up after {retry.retries + 1} attempts without progress: {err}",
                    f"check your connection or the host and re-run; {part.name} is kept "
                    "and the next run resumes from it",
                ) from err
            wait = retry.delay(max(failures - 1, 0))
            log.warning("%s: %s; retrying in %.2fs", url, err, wait)
            time.sleep(wait)


def _move_into_place(part: Path, dest: Path) -> None:
    """Rename the verified `part` to `dest`, durably (fsync'ed file and folder)."""
    # The transfer already synced `part`, so the step between the two renames is
    # short; a kill inside it costs a fresh download, never a half file at `dest`.
    with atomic_path(dest) as staged:
        os.replace(part, staged)


def download_many(
    jobs: list[tuple[str, Path]],
    *,
    workers: int = 8,
    retry: RetryPolicy | None = None,
    progress: bool = True,
    desc: str = "files",
) -> None:
    """Download `(url, dest)` pairs on at most `workers` threads, one bar for all.

    The first failure cancels the jobs not yet started and is raised once the
    running ones finish, so the message names the URL that failed.
    """
    if not jobs:
        return
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()

    def fetch_one(job: tuple[str, Path]) -> None:
        # requests.Session is not documented as thread-safe: one per worker thread.
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            with lock:
                sessions.append(session)
        url, dest = job
        download(url, dest, retry=retry, session=session, progress=False)

    try:
        with (
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
            tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress) as bar,
        ):
            futures = [pool.submit(fetch_one, job) for job in jobs]
            for future in as_completed(futures):
                if future.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise future.exception()
                bar.update()
    finally:
        for session in sessions:
            session.close()
