"""Put params.yaml back after a `dvc exp run -S ...` whose parameters failed the check.

`dvc exp run` in the workspace writes the `-S` values into params.yaml before
any stage runs, and leaves them there when the run fails (measured with DVC
3.67: the file keeps `-S a.x=-5` after the first stage exits 1). A rejected
experiment should leave the workspace as it found it, so the `check` stage,
when it fails inside an experiment, sets every key that differs back to the
value the last passing check recorded in dvc.lock (or, before any passing
check, to the experiment's baseline commit). Only the differing values are
rewritten, in place: comments and layout stay. Plain `dvc repro` never
touches the file: there the person edited it and fixes it themselves.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from captioning.atomic_files import atomic_write

EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by DVC for every stage an experiment runs
BASELINE_ENV = "DVC_EXP_BASELINE_REV"


def in_experiment() -> bool:
    return bool(os.environ.get(EXPERIMENT_ENV))


def checked_params(lock_path: Path | str, stage: str, params_name: str = "params.yaml") -> dict:
    """The params the last successful run of `stage` recorded in dvc.lock ({} if none)."""
    try:
        lock = yaml.safe_load(Path(lock_path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}
    entry = (lock.get("stages") or {}).get(stage) or {}
    return dict((entry.get("params") or {}).get(params_name) or {})


def baseline_text(repo: Path | str, params_name: str = "params.yaml") -> str | None:
    """params.yaml at the experiment's baseline commit, as text (None outside an experiment)."""
    rev = os.environ.get(BASELINE_ENV)
    if not rev:
        return None
    shown = subprocess.run(
        ["git", "show", f"{rev}:{params_name}"], cwd=repo, capture_output=True, text=True
    )
    return shown.stdout if shown.returncode == 0 else None


def restore_after_experiment(
    params_path: Path | str, lock_path: Path | str, stage: str
) -> list[str]:
    """Undo a failed experiment's params: back to the last passing `stage` run, else the baseline.

    When those values are the baseline commit's, its file comes back byte for
    byte; otherwise each differing key is set back in place (`restore`).
    Returns the keys that differed, dotted.
    """
    committed = baseline_text(Path(params_path).parent)
    baseline = (yaml.safe_load(committed) or {}) if committed is not None else {}
    previous = checked_params(lock_path, stage) or baseline
    changed = restore(params_path, previous)
    if changed and committed is not None and previous == baseline:
        atomic_write(params_path, committed)
    return changed


def restore(params_path: Path | str, previous: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Set the keys of `params_path` that differ from `previous` back; return them, dotted.

    Sections and keys absent from `previous` (added with `-S +section.key=...`) are removed.
    Sections `previous` does not know are left alone when `previous` is empty.
    """
    if not previous:
        return []
    path = Path(params_path)
    round_trip = YAML()
    round_trip.preserve_quotes = True
    # `null`, as people (and yaml.safe_dump) write it; ruamel's default is an empty value.
    round_trip.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = round_trip.load(path.read_text(encoding="utf-8"))
    changed: list[str] = []
    for name in [n for n in document if n not in previous]:
        del document[name]
        changed.append(name)
    for name, old in previous.items():
        current = document.get(name)
        if not (isinstance(old, Mapping) and isinstance(current, Mapping)):
            if current != old:
                document[name] = old
                changed.append(name)
            continue
        for key in [k for k in current if k not in old]:
            del current[key]
            changed.append(f"{name}.{key}")
        for key, value in old.items():
            if key not in current or current[key] != value:
                current[key] = value
                changed.append(f"{name}.{key}")
    if changed:
        buffer = io.StringIO()
        round_trip.dump(document, buffer)
        atomic_write(path, buffer.getvalue())
    return changed
