"""After `dvc repro`: does the DVC cache hold every output dvc.lock names? (`make repro`)

A cache on a full disk makes `dvc repro` log "No space left on device"
transfer errors for a folder output's files and still exit 0 (measured with
DVC 3.67: the lock names the folder, the cache lacks it, and half-written
`.tmp` files stay in the cache). `python -m captioning.dvc_cache` runs after
it: `dvc data status --json` lists what is not in the cache, `dvc status`
whether any stage is still out of date; either one fails with a one-line
error per problem naming the path, and the leftover temporary files are
counted (not deleted: a shared cache may have other writers at work).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def _dvc() -> str:
    # The dvc beside this interpreter (the project's virtualenv), else the one on PATH.
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_dvc(), *args], cwd=cwd, capture_output=True, text=True)


def cache_dir(repo: Path) -> Path:
    done = _run("cache", "dir", cwd=repo)
    return Path(done.stdout.strip()) if done.returncode == 0 else repo / ".dvc" / "cache"


def leftover_temporaries(cache: Path) -> list[Path]:
    """The `.tmp` files failed transfers left in the cache's `files/` tree."""
    root = cache / "files"
    return sorted(root.rglob(".*.tmp")) if root.is_dir() else []


def problems(repo: Path) -> list[str]:
    """One line per output missing from the cache or stage out of date; empty when all is well."""
    found: list[str] = []
    data = _run("data", "status", "--json", cwd=repo)
    if data.returncode != 0:
        return [f"`dvc data status` failed: {(data.stderr or data.stdout).strip()}"]
    cache = cache_dir(repo)
    for path in json.loads(data.stdout or "{}").get("not_in_cache", []):
        found.append(f"{path} is not in the DVC cache ({cache}): was its disk full?")
    status = _run("status", "--json", cwd=repo)
    if status.returncode != 0:
        return [*found, f"`dvc status` failed: {(status.stderr or status.stdout).strip()}"]
    stale = sorted(json.loads(status.stdout or "{}"))
    if stale:
        found.append(f"stages still out of date after dvc repro: {', '.join(stale)}")
    if found:
        leftovers = leftover_temporaries(cache)
        if leftovers:
            size = sum(p.stat().st_size for p in leftovers if p.exists()) / 2**20
            found.append(
                f"{len(leftovers)} partial .tmp files ({size:.1f} MiB) from failed transfers in "
                f"{cache / 'files'}: once no dvc runs, remove them "
                f"(find {cache / 'files'} -name '.*.tmp' -delete)"
            )
        found.append(
            f"free space where {cache} lives (df -h {cache}), then `dvc commit -f` "
            "(or run again) to fill the cache"
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the DVC project")
    args = parser.parse_args()
    found = problems(Path(args.repo))
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if found:
        sys.exit(1)
    print("dvc cache: every output dvc.lock names is in the cache")


if __name__ == "__main__":
    main()
