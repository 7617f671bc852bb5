"""Which shards of a feature store are finished: the store's manifest and the parts' records.

A whole-store run records every finished shard with its key in
`manifest.json`. A store can also be extracted in parts, run independently
(on several hosts, into one shared folder or into folders copied together
afterwards): part K of N writes only its own shards and records them in its
own file, `manifest.part-K-of-N.json`, so that parts never write the same
file. A whole-store run then merges: it trusts each shard the records vouch
for, writes the rest, folds everything into `manifest.json` and removes the
part records, so a store extracted in parts ends byte-identical to one
extracted in one go. A part writes a `null` key for each of its shards before
rewriting it, so no record ever vouches for a shard that is being replaced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from captioning.atomic_files import atomic_write

MANIFEST_FILE = "manifest.json"
# Part of every shard key and manifest: bump it when the shard layout, the key or
# the way pixels are read changes, so that shards written the other way are redone.
STORE_FORMAT = 3
_PART_RE = re.compile(r"^manifest\.part-(?P<part>\d+)-of-(?P<parts>\d+)\.json$")


def part_manifest_name(part: int, parts: int) -> str:
    return f"manifest.part-{part}-of-{parts}.json"


def is_part_manifest(path: Path) -> bool:
    return bool(_PART_RE.match(path.name))


def _read_keys(path: Path) -> dict[str, str | None]:
    try:
        keys = json.loads(path.read_text())["shards"]
        return {str(name): (None if key is None else str(key)) for name, key in keys.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_keys(path: Path, keys: dict[str, str | None], **extra) -> None:
    content = {"format": STORE_FORMAT, **extra, "shards": dict(sorted(keys.items()))}
    atomic_write(path, json.dumps(content, indent=1) + "\n")


def write_manifest(out: Path, keys: dict[str, str]) -> None:
    """The whole store's record: {shard name: key} of every finished shard."""
    _write_keys(out / MANIFEST_FILE, keys)


def write_part_manifest(out: Path, part: int, parts: int, keys: dict[str, str | None]) -> None:
    """Part K of N's record of its own shards: their keys, or None while not (re)written."""
    _write_keys(out / part_manifest_name(part, parts), keys, part=part, parts=parts)


def recorded_keys(out: Path) -> dict[str, str]:
    """{shard name: key} that the store's records vouch for, the parts' records merged in.

    A part's record of a shard overrides `manifest.json`'s (the part wrote the
    shard later). Where records of several parts name one shard (parts of
    runs with different part counts), they must agree, else none is trusted
    and the shard is written again: redoing a shard costs time, trusting the
    wrong one would cost correctness.
    """
    keys = {name: key for name, key in _read_keys(out / MANIFEST_FILE).items() if key}
    from_parts: dict[str, set[str | None]] = {}
    for path in sorted(out.glob("manifest.part-*.json")):
        if is_part_manifest(path):
            for name, key in _read_keys(path).items():
                from_parts.setdefault(name, set()).add(key)
    for name, candidates in from_parts.items():
        agreed = next(iter(candidates)) if len(candidates) == 1 else None
        if agreed:
            keys[name] = agreed
        else:
            keys.pop(name, None)
    return keys


def remove_part_manifests(out: Path) -> None:
    """After a merge, `manifest.json` holds everything the parts recorded."""
    for path in out.glob("manifest.part-*.json"):
        if is_part_manifest(path):
            path.unlink(missing_ok=True)
