"""Resumable, verified HTTP downloads: the one way this project fetches a file.

Every transfer (the data sources in `captioning.data.coco` and
`captioning.data.flickr`, the extractor's ImageNet weights) goes through
`download` or `download_many`, so all behave alike: a file is streamed to
`<name>.part` with a progress bar, resumed with an HTTP Range request after an
interruption (a server that ignores Range and answers 200 restarts the file
cleanly), retried with exponential backoff on connection errors and 5xx answers,
checked against the server's Content-Length, an expected size and a checksum
where one is known, and only then moved into place, synced to disk. A final
file therefore always means a verified file, which is what lets a second run
skip it. Unpacking archives is `captioning.data.archives`' job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from captioning.atomic_files import atomic_path

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A transfer or archive failed in a way a retry will not fix; says what to do."""

    def __init__(self, url: str, problem: str, advice: str):
        self.url = url
        self.problem = problem
        self.advice = advice
        label = "URL" if "://" in url else "File"
        super().__init__(f"{problem}\n  {label}: {url}\n  What to do: {advice}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transfer is retried.

    The delay before retry k (0-based) is `min(max_delay_s, backoff_s * 2**k)`;
    tests use tiny delays so that fault injection stays fast.
    """

    retries: int = 5
    backoff_s: float = 1.0
    max_delay_s: float = 60.0
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 120.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        return min(self.max_delay_s, self.backoff_s * 2**attempt)


class _Retryable(Exception):
    """Internal: this attempt failed, another one may succeed."""


def _new_hasher(checksum: str | None):
    if checksum is None:
        return None
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ("md5", "sha256") or not digest:
        raise ValueError(f"checksum must look like 'md5:<hex>' or 'sha256:<hex>', got {checksum!r}")
    return hashlib.new(algorithm)


def _hash_prefix(hasher, path: Path) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            hasher.update(block)


def _total_from_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from `bytes START-END/TOTAL` or `bytes */TOTAL`."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


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
    """Repeat `_attempt` until `part` is complete and verified, or the retries run out."""
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(url, part, session, expected_size, checksum, retry, progress)
            return
        except _Retryable as err:
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


def _attempt(
    url: str,
    part: Path,
    session: requests.Session,
    expected_size: int | None,
    checksum: str | None,
    retry: RetryPolicy,
    progress: bool,
) -> None:
    """One GET: append to or restart `part`; return once it is complete and verified."""
    offset = _resume_offset(part, expected_size)
    with _get(url, session, offset, retry) as response:
        if response.status_code == 416 and offset:
            _finish_unsatisfiable_range(url, part, offset, response, expected_size, checksum)
            return
        _check_status(url, response.status_code)
        offset, total, hasher = _body_start(url, part, offset, response, expected_size, checksum)
        written = _stream_body(response, part, offset, total, hasher, progress)
    if total is not None and written < total:
        raise _Retryable(f"transfer interrupted at byte {written} of {total}")
    _verify(url, part, written, total, checksum, hasher)


def _resume_offset(part: Path, expected_size: int | None) -> int:
    """How many bytes of `part` to keep; a part longer than the file is thrown away."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    return offset


def _get(url: str, session: requests.Session, offset: int, retry: RetryPolicy) -> requests.Response:
    """The streamed response to a GET of `url` from byte `offset` on."""
    # identity: a gzip-encoding server would make byte counts and Range offsets
    # refer to different streams.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return session.get(
            url,
            headers=headers,
            stream=True,
            timeout=(retry.connect_timeout_s, retry.read_timeout_s),
        )
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Retryable(f"connection failed ({type(err).__name__})") from err


def _finish_unsatisfiable_range(
    url: str,
    part: Path,
    offset: int,
    response: requests.Response,
    expected_size: int | None,
    checksum: str | None,
) -> None:
    """416 to a resume: `part` is complete if the server's total is its size, else restart."""
    _, total = _total_from_content_range(response.headers.get("Content-Range"))
    if total == offset:
        _verify(url, part, offset, expected_size, checksum, None)
        return
    part.unlink()
    raise _Retryable(f"range {offset}- not satisfiable; restarting from zero")


def _check_status(url: str, status: int) -> None:
    """Raise for any status but 200 and 206: `_Retryable` where trying again may help."""
    if status in (404, 410):
        raise DownloadError(
            url,
            f"the server answered {status} Not Found",
            "check the URL (data.base_url, data.images_url or data.karpathy_url in "
            "params.yaml) and that the host or mirror really holds this file",
        )
    if status in (401, 403):
        raise DownloadError(
            url,
            f"the server refused access ({status})",
            "the file may need a login or a signed link; download it by hand or "
            "point the URL in params.yaml at a mirror you can read",
        )
    if status == 429 or status >= 500:
        raise _Retryable(f"server error {status}")
    if status not in (200, 206):
        raise DownloadError(
            url,
            f"unexpected HTTP status {status}",
            "check the URL in params.yaml; this host does not serve the file as expected",
        )


def _body_start(
    url: str,
    part: Path,
    offset: int,
    response: requests.Response,
    expected_size: int | None,
    checksum: str | None,
) -> tuple[int, int | None, Any]:
    """(offset the body starts at, the file's total size if known, hasher fed the bytes before)."""
    hasher = _new_hasher(checksum)
    if response.status_code == 206:
        start, total = _total_from_content_range(response.headers.get("Content-Range"))
        if start != offset:
            part.unlink(missing_ok=True)
            raise _Retryable(f"asked for bytes {offset}- but got {start}-; restarting")
        if hasher is not None and offset:
            _hash_prefix(hasher, part)
    else:
        # 200 is the whole file from byte zero, whatever we asked for: never
        # append it to what is already there.
        offset = 0
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    if expected_size is not None and total is not None and total != expected_size:
        raise DownloadError(
            url,
            f"the server offers {total} bytes but the published size is {expected_size}",
            "this host serves a different file under the same name; use the official "
            "host or a faithful mirror (data.base_url)",
        )
    return offset, (total if total is not None else expected_size), hasher


def _stream_body(
    response: requests.Response,
    part: Path,
    offset: int,
    total: int | None,
    hasher: Any,
    progress: bool,
) -> int:
    """Write the body to `part` from `offset` on (appending or truncating); return its new size."""
    # Let a cut connection hand over every byte it delivered; completeness is
    # checked afterwards against the size, which also decides whether to resume.
    if hasattr(response.raw, "enforce_content_length"):
        response.raw.enforce_content_length = False
    written = offset
    with (
        open(part, "ab" if offset else "wb") as fh,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name[: -len(".part")],
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        try:
            for block in response.iter_content(CHUNK_BYTES):
                fh.write(block)
                written += len(block)
                if hasher is not None:
                    hasher.update(block)
                bar.update(len(block))
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as err:
            raise _Retryable(f"transfer interrupted at byte {written}") from err
        if total is None or written >= total:
            fh.flush()
            os.fsync(fh.fileno())  # on disk under the .part name before it is renamed
    return written


def _verify(url, part: Path, size: int, total, checksum, hasher) -> None:
    if total is not None and size != total:
        part.unlink()
        raise DownloadError(
            url,
            f"received {size} bytes but expected {total}",
            "the partial file was deleted; re-run, and if it happens again the host is "
            "sending inconsistent data",
        )
    if checksum is None:
        return
    if hasher is None:
        hasher = _new_hasher(checksum)
        _hash_prefix(hasher, part)
    algorithm, _, expected = checksum.partition(":")
    actual = hasher.hexdigest()
    if actual != expected.lower():
        part.unlink()
        raise DownloadError(
            url,
            f"{algorithm} checksum mismatch: got {actual}, expected {expected}",
            "the corrupt file was deleted; re-run to download it again, and if the "
            "mismatch repeats the host serves a damaged or different file (check data.base_url)",
        )


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
