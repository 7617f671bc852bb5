"""Atomic file writes: the one way this project puts a file or folder in place.

A reader (DVC, a resumed stage, the scoring server) sees either the old file or
the whole new one, never a half-written one, whatever kills the writer. Every
write goes to a uniquely named temporary sibling in the same folder (so the
final `os.replace` is a rename on one file system, and two writers never share
a temporary name), is flushed and fsync'ed, renamed into place, and the folder
is fsync'ed so the rename itself survives a power cut. A failed write removes
its temporary file and leaves the target as it was; one that failed because
the disk is full raises `DiskFullError`, which names the target path, so the
stage's one-line error says where the space ran out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_MARKER = ".tmp-"  # every temporary sibling's name contains this (see `is_temporary`)


class DiskFullError(OSError):
    """No space left on the device while writing `path` (errno ENOSPC or EDQUOT)."""

    def __init__(self, path: Path | str, cause: BaseException | None = None):
        self.path = Path(path)
        try:
            free = f"{shutil.disk_usage(self.path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device writing {self.path} ({free} there): "
            "free some space or point the output elsewhere, then run the stage again",
        )
        self.__cause__ = cause

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is "no space left" (or a quota)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # Some writers (pyarrow, h5py) re-raise it without an errno, in the message only.
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def _disk_full_names(path: Path) -> Iterator[None]:
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise DiskFullError(path, err) from err
        raise


def temporary_sibling(path: Path | str, suffix: str = "") -> Path:
    """A fresh hidden name beside `path`; `suffix` keeps an extension writers look at (.parquet)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def is_temporary(path: Path | str) -> bool:
    """Whether `path` is a leftover temporary sibling of a write that was killed."""
    return TEMP_MARKER in Path(path).name


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        _fsync_dir(Path(folder))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; it replaces `path` on success.

    For writers that want a file name (pandas, Keras, h5py):
        with atomic_path(out, ".parquet") as tmp:
            table.to_parquet(tmp)
    """
    path = Path(path)
    tmp = temporary_sibling(path, suffix)
    try:
        with _disk_full_names(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path | str, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:
        fh.write(payload)


def write_if_changed(path: Path | str, data: bytes | str) -> bool:
    """Atomically write `data` unless `path` already holds exactly that; return whether it wrote.

    An unchanged file keeps its mtime, so DVC and make see no change on a re-run.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if path.is_file() and path.stat().st_size == len(payload) and path.read_bytes() == payload:
        return False
    atomic_write(path, payload)
    return True


@contextlib.contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces the folder `path` as a whole.

    A kill before the swap leaves the old folder untouched; a kill between the
    two renames leaves the new folder in place and the old one under a
    temporary name that the next call ignores.
    """
    path = Path(path)
    staged = temporary_sibling(path)
    try:
        with _disk_full_names(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.mkdir()
            yield staged
            _fsync_tree(staged)
            old = temporary_sibling(path, ".old")
            if path.exists():
                os.replace(path, old)
            os.replace(staged, path)
            _fsync_dir(path.parent)
            _remove(old)
    finally:
        _remove(staged)
