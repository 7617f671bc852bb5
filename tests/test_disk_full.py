"""A full disk: the pipeline's own writes name the path, and `make repro` notices a short cache.

Each test mounts a small tmpfs (root only; skipped with the reason where the
mount is refused) and fills it. The atomic writes raise `DiskFullError` naming
the target and leave the old file and no temporary behind; a stage says so in
one line; and `make repro` fails when dvc exits 0 with a folder output that
never reached a full cache (DVC 3.67 does), naming the folder.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from captioning.atomic_files import (
    DiskFullError,
    atomic_directory,
    atomic_path,
    atomic_write,
    is_temporary,
)
from pipeline_fixtures import GIT_USER, REPO_ROOT, VENV_BIN, describe


@pytest.fixture
def small_disk(tmp_path):
    """A mounted 256 KiB tmpfs (unmounted after the test)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(done.stderr or done.stdout).strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(folder: Path) -> None:
    """Write a filler file until the file system under `folder` has no space left."""
    with open(folder / f"filler-{uuid.uuid4().hex[:6]}", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_an_atomic_write_on_a_full_disk_names_the_path_and_keeps_the_old_file(small_disk):
    target = small_disk / "reports" / "metrics.json"
    atomic_write(target, b"old")
    _fill(small_disk)
    with pytest.raises(DiskFullError) as err:
        atomic_write(target, b"x" * 100_000)
    assert err.value.errno == errno.ENOSPC and err.value.path == target
    assert str(err.value).startswith(f"no space left on the device writing {target} (")
    assert target.read_bytes() == b"old"
    assert not [p for p in small_disk.rglob("*") if is_temporary(p)]

    with (
        pytest.raises(DiskFullError, match="tokens.npy"),
        atomic_path(small_disk / "tokens.npy", ".npy") as tmp,
    ):
        np.save(tmp, np.zeros(100_000, np.int32))  # numpy's own writer, inside atomic_path
    folder = small_disk / "shards"
    with pytest.raises(DiskFullError, match="shards"), atomic_directory(folder) as staged:
        (staged / "part.bin").write_bytes(b"y" * 100_000)
    assert not folder.exists()
    assert not [p for p in small_disk.rglob("*") if is_temporary(p)]


def test_a_stage_on_a_full_disk_says_where_in_one_line(small_disk):
    out = small_disk / "reports" / "params_check.json"
    out.parent.mkdir()
    _fill(small_disk)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "CAPTIONING_"))}
    done = subprocess.run(
        [sys.executable, "-m", "stages.check", "--params", str(REPO_ROOT / "params.yaml"),
         "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, describe(done)
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: no space left on the device writing {out} ("), line


# A stage with a folder output: DVC transfers it to the cache file by file.
FOLDER_STAGE = """\
stages:
  shards:
    cmd: mkdir -p shards && for i in 1 2 3 4 5 6; do head -c 60000 /dev/urandom > shards/$i; done
    outs:
      - shards
"""


def _make_repro(project: Path) -> subprocess.CompletedProcess:
    venv = VENV_BIN.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    # -o: the project's install target (pip) is not remade; it is installed already.
    return subprocess.run(
        ["make", "-f", str(REPO_ROOT / "Makefile"), "-C", str(project), "repro",
         f"VENV={venv}", "-o", f"{venv}/bin/captioning"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _folder_project(root: Path) -> Path:
    root.mkdir()
    (root / "dvc.yaml").write_text(FOLDER_STAGE)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(
        ["git", *GIT_USER, "commit", "-q", "--allow-empty", "-m", "init"], cwd=root, check=True
    )
    dvc = str(VENV_BIN / "dvc")
    subprocess.run([dvc, "init", "-q"], cwd=root, check=True)
    subprocess.run([dvc, "config", "core.analytics", "false"], cwd=root, check=True)
    return root


@pytest.mark.slow
def test_make_repro_fails_when_the_cache_could_not_take_an_output(small_disk, tmp_path):
    full = _folder_project(tmp_path / "full")
    subprocess.run([str(VENV_BIN / "dvc"), "cache", "dir", str(small_disk)], cwd=full, check=True)
    done = _make_repro(full)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    assert "No space left on device" in log  # dvc's own transfer errors
    assert f"error: shards/ is not in the DVC cache ({small_disk})" in log, log

    roomy = _folder_project(tmp_path / "roomy")
    done = _make_repro(roomy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every output dvc.lock names is in the cache" in done.stdout
