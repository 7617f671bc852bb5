"""Resumable, verified HTTP downloads and safe archive extraction.

Every dataset source (`captioning.data.coco`, `captioning.data.flickr`) moves its
bytes through this module so that all transfers behave alike: a file is streamed
to `<name>.part` with a progress bar, resumed with an HTTP Range request after an
interruption (a server that ignores Range and answers 200 restarts the file
cleanly), retried with exponential backoff on connection errors and 5xx answers,
checked against the server's Content-Length, an expected size and a checksum
where one is known, and only then renamed into place. A final file therefore
always means a verified file, which is what lets a second run skip it.
`extract_archive` unpacks zip and tar files while refusing members that would
land outside the target folder, and leaves a marker so it runs once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import requests
from tqdm import tqdm

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


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the extraction folder."""


class CorruptArchiveError(DownloadError):
    """An archive cannot be read back (bad CRC, truncated stream)."""


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
    retry = retry or RetryPolicy()
    if dest.exists():
        # The rename below happens only after verification, so an existing file is
        # complete; an expected size that disagrees means it came from another host.
        if expected_size is None or dest.stat().st_size == expected_size:
            return dest
        log.warning(
            "%s has %d bytes, expected %d: downloading again",
            dest,
            dest.stat().st_size,
            expected_size,
        )
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    failures = 0
    last_error = ""
    try:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _attempt(url, part, session, expected_size, checksum, retry, progress)
                break
            except _Retryable as err:
                last_error = str(err)
                after = part.stat().st_size if part.exists() else 0
                # A cut that still delivered bytes is progress, not a failure; only
                # attempts that got nothing count against the retry budget.
                failures = 0 if after > before else failures + 1
                if failures > retry.retries:
                    raise DownloadError(
                        url,
                        f"giving up after {retry.retries + 1} attempts without progress: {last_error}",
                        f"check your connection or the host and re-run; {part.name} is kept "
                        "and the next run resumes from it",
                    ) from err
                wait = retry.delay(max(failures - 1, 0))
                log.warning("%s: %s; retrying in %.2fs", url, last_error, wait)
                time.sleep(wait)
    finally:
        if own_session:
            session.close()
    os.replace(part, dest)
    return dest


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
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    # identity: a gzip-encoding server would make byte counts and Range offsets
    # refer to different streams.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(
            url,
            headers=headers,
            stream=True,
            timeout=(retry.connect_timeout_s, retry.read_timeout_s),
        )
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Retryable(f"connection failed ({type(err).__name__})") from err
    with response:
        status = response.status_code
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
        if status == 416 and offset:
            _, total = _total_from_content_range(response.headers.get("Content-Range"))
            if total == offset:
                _verify(url, part, offset, expected_size, checksum, None)
                return
            part.unlink()
            raise _Retryable(f"range {offset}- not satisfiable; restarting from zero")
        if status == 429 or status >= 500:
            raise _Retryable(f"server error {status}")
        if status not in (200, 206):
            raise DownloadError(
                url,
                f"unexpected HTTP status {status}",
                "check the URL in params.yaml; this host does not serve the file as expected",
            )

        hasher = _new_hasher(checksum)
        if status == 206:
            start, total = _total_from_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"asked for bytes {offset}- but got {start}-; restarting")
            mode = "ab"
            if hasher is not None and offset:
                _hash_prefix(hasher, part)
        else:
            # 200 is the whole file from byte zero, whatever we asked for: never
            # append it to what is already there.
            offset = 0
            mode = "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(
                url,
                f"the server offers {total} bytes but the published size is {expected_size}",
                "this host serves a different file under the same name; use the official "
                "host or a faithful mirror (data.base_url)",
            )
        total = total if total is not None else expected_size

        # Let a cut connection hand over every byte it delivered; completeness is
        # checked below against the size, which also decides whether to resume.
        if hasattr(response.raw, "enforce_content_length"):
            response.raw.enforce_content_length = False
        written = offset
        with (
            open(part, mode) as fh,
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
    if total is not None and written < total:
        raise _Retryable(f"transfer interrupted at byte {written} of {total}")
    _verify(url, part, written, total, checksum, hasher)


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


# ---------------------------------------------------------------- extraction


def _marker(archive: Path, target: Path) -> Path:
    return target / f".{archive.name}.extracted"


def is_extracted(archive: Path | str, target: Path | str) -> bool:
    """Whether `extract_archive(archive, target)` has completed before."""
    return _marker(Path(archive), Path(target)).exists()


def _check_member_name(archive: Path, name: str, target: Path) -> PurePosixPath:
    """The member's relative path, or UnsafeArchiveError if it could escape `target`."""
    posix = name.replace("\\", "/")
    relative = PurePosixPath(posix)
    if (
        posix.startswith("/")
        or re.match(r"^[A-Za-z]:", posix)
        or ".." in relative.parts
        or not (target / relative).resolve().is_relative_to(target.resolve())
    ):
        raise UnsafeArchiveError(
            str(archive),
            f"archive member {name!r} would be written outside {target}",
            "the archive is malformed or malicious; nothing was extracted. Delete it and "
            "fetch it from a source you trust",
        )
    return relative


def _refuse_link(archive: Path, name: str) -> None:
    raise UnsafeArchiveError(
        str(archive),
        f"archive member {name!r} is a link or special file",
        "links could point outside the extraction folder, so nothing was extracted. "
        "Delete the archive and fetch it from a source you trust",
    )


def _copy_member(source, dest: Path, size: int) -> None:
    # Same-size files are left alone so that resuming an interrupted extraction
    # (or re-extracting into a complete folder) does not rewrite anything.
    if dest.exists() and dest.stat().st_size == size:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK_BYTES)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def extract_archive(
    archive: Path | str,
    target: Path | str,
    *,
    include: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> Path:
    """Unpack a zip or tar `archive` into `target` once; return `target`.

    Every member is checked before anything is written: absolute paths, `..`,
    symlinks, hard links and device files make the whole archive refused with
    `UnsafeArchiveError`. `include(name)` selects members to write. A marker file
    `.<archive name>.extracted` in `target` makes later calls return at once.
    """
    archive, target = Path(archive), Path(target)
    marker = _marker(archive, target)
    if marker.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    include = include or (lambda name: True)
    try:
        written = _extract_members(archive, target, include, progress)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # a real disk problem (full, read-only), not a damaged archive
        raise CorruptArchiveError(
            str(archive),
            f"the archive is damaged ({type(err).__name__}: {err})",
            f"delete {archive} and re-run to download it again",
        ) from err
    write_if_changed(
        marker,
        json.dumps(
            {"archive": archive.name, "bytes": archive.stat().st_size, "files": written}, indent=1
        )
        + "\n",
    )
    return target


def _extract_members(archive: Path, target: Path, include, progress: bool) -> int:
    written = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_member_name(archive, info.filename, target)
                # Only unix-made zips carry a file type in the high attribute bits;
                # writers often leave it zero, which means a plain file.
                kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    _refuse_link(archive, info.filename)
            chosen = [i for i in infos if not i.is_dir() and include(i.filename)]
            for info in tqdm(
                chosen, desc=f"extract {archive.name}", disable=not progress, leave=False
            ):
                dest = target / _check_member_name(archive, info.filename, target)
                with zf.open(info) as source:
                    _copy_member(source, dest, info.file_size)
                written += 1
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            for member in members:
                _check_member_name(archive, member.name, target)
                if not (member.isfile() or member.isdir()):
                    _refuse_link(archive, member.name)
            chosen = [m for m in members if m.isfile() and include(m.name)]
            for member in tqdm(
                chosen, desc=f"extract {archive.name}", disable=not progress, leave=False
            ):
                dest = target / _check_member_name(archive, member.name, target)
                source = tf.extractfile(member)
                assert source is not None  # regular files always have a stream
                with source:
                    _copy_member(source, dest, member.size)
                written += 1
    else:
        raise CorruptArchiveError(
            str(archive),
            "not a zip or tar archive",
            f"delete {archive} and re-run; if it repeats, the URL does not point at an archive",
        )
    return written


def fetch_archive(
    url: str,
    archive: Path | str,
    target: Path | str,
    *,
    include: Callable[[str], bool] | None = None,
    expected_size: int | None = None,
    checksum: str | None = None,
    retry: RetryPolicy | None = None,
    remove_archive: bool = False,
    progress: bool = True,
) -> Path:
    """Download `url` to `archive` and extract it into `target`, each step once.

    Once extracted (marker present) nothing is fetched again, even if the
    archive was removed (`remove_archive=True` deletes it after extraction). A
    damaged archive is deleted and reported with its URL, so a re-run fetches it
    afresh.
    """
    archive, target = Path(archive), Path(target)
    if is_extracted(archive, target):
        return target
    download(
        url, archive, expected_size=expected_size, checksum=checksum, retry=retry, progress=progress
    )
    try:
        extract_archive(archive, target, include=include, progress=progress)
    except CorruptArchiveError as err:
        archive.unlink(missing_ok=True)
        raise CorruptArchiveError(
            url,
            f"{err.problem} after download",
            "it was deleted; re-run to download it again, "
            "and if it repeats the host serves a damaged file (check the URL in params.yaml)",
        ) from err
    if remove_archive:
        archive.unlink(missing_ok=True)
    return target


def write_if_changed(path: Path | str, text: str | bytes) -> bool:
    """Atomically write `text` to `path` unless it already holds exactly that.

    Returns whether the file was written; an unchanged file keeps its mtime, so
    DVC and make see no change on a re-run.
    """
    path = Path(path)
    data = text.encode("utf-8") if isinstance(text, str) else text
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True
