"""One HTTP GET of a download: resume from a `.part` file, stream the body, verify it.

`fetch_once` asks for the bytes `<name>.part` lacks with a Range request (a
server that ignores Range and answers 200 restarts the file cleanly), sorts the
answer's status into fatal (`DownloadError`) or worth another try (`Retryable`),
streams the body with a progress bar, and checks the result against the
server's Content-Length, an expected size and a checksum where one is known;
the `.part` file is synced to disk before it is declared complete.
`captioning.data.download` retries it and moves the verified file into place.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from captioning.data.download_failures import DownloadError, Retryable, RetryPolicy

CHUNK_BYTES = 1 << 20


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


def fetch_once(
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
        raise Retryable(f"transfer interrupted at byte {written} of {total}")
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
        raise Retryable(f"connection failed ({type(err).__name__})") from err


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
    raise Retryable(f"range {offset}- not satisfiable; restarting from zero")


def _check_status(url: str, status: int) -> None:
    """Raise for any status but 200 and 206: `Retryable` where trying again may help."""
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
        raise Retryable(f"server error {status}")
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
            raise Retryable(f"asked for bytes {offset}- but got {start}-; restarting")
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
            raise Retryable(f"transfer interrupted at byte {written}") from err
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
