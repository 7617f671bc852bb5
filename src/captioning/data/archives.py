"""Safe, resumable archive extraction, and fetching an archive to extract it.

`extract_archive` unpacks a zip or tar file into a folder once: every member
is checked before anything is written, and a member whose path would land
outside the folder, or that is a link or device file, makes the whole archive
refused. Members are written atomically and files already there at the right
size are kept, so an interrupted extraction resumes; a marker file records a
completed one. `fetch_archive` downloads an archive with
`captioning.data.download` and extracts it, each step once.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from captioning.atomic_files import atomic_path, write_if_changed
from captioning.data.download import download
from captioning.data.download_failures import DownloadError, RetryPolicy
from captioning.data.transfer import CHUNK_BYTES


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the extraction folder."""


class CorruptArchiveError(DownloadError):
    """An archive cannot be read back (bad CRC, truncated stream)."""


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
    with atomic_path(dest) as tmp, open(tmp, "xb") as out:
        shutil.copyfileobj(source, out, CHUNK_BYTES)


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
