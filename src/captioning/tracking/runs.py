"""MLflow helpers: where runs go, what every run records, and the per-epoch logger.

Train and evaluate log to the same run: train opens it and leaves its id in a
small JSON file beside the model, evaluate reopens it. Every run carries the
same parameter names (all params.yaml sections, flattened as `section.key`)
and tags for the git commit, the DVC experiment name and the data hash, so runs
line up column by column in the MLflow UI. The library never assumes a
tracking server: the stage passes the repository root, and a sqlite file
`mlflow.db` there is the default store (`MLFLOW_TRACKING_URI` overrides it).
Against a team server (docs/team.md) the login comes from
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, which MLflow reads
itself: nothing here records them, and a URI with a password inside is refused.
Runs get a readable name (the DVC experiment or the commit, then the params
that differ from the commit's, then any edited source files: what the pipeline
writes itself, dvc.lock and the stages' outputs, does not count as an edit)
and each split of the caption table they read as a dataset input, under the
split's name as its context (train, val; evaluate adds test). MLflow 3.17's UI
opens an experiment in its GenAI view unless the link asks for the training
one (`experiment_url`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import keras
import mlflow
import yaml

DEFAULT_EXPERIMENT = "image-captioning"
# The experiment kind tag: what the experiment holds, for tools and UIs that read it. MLflow
# 3.17's own UI no longer does: it picks its view from the link (`experiment_url`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The UI's query parameter (and sidebar switch, remembered per browser) for the training view:
# the runs table, metrics charts and models instead of GenAI traces.
TRAINING_VIEW = {"workflowType": "machine_learning"}
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store
MAX_RUN_NAME = 120  # characters; the UI's run table cuts longer names anyway
EDITS_NAMED = 2  # edited files a run name lists before "+N more"


def project_root(repo_root: str | Path) -> Path:
    """The repository a run belongs to, also from inside a queued DVC experiment.

    `dvc queue start` runs each queued experiment in a temporary copy of the
    repository under `<repo>/.dvc/tmp/exps/`, deleted afterwards; its runs
    belong in `<repo>`'s store, not in the copy's.
    """
    root = Path(repo_root).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(repo_root: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute sqlite URI to `<repo>/mlflow.db`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root(repo_root) / 'mlflow.db'}"


def check_no_secret(uri: str) -> None:
    """Refuse a tracking URI with a password in it: MLflow would record and print it."""
    if urlsplit(uri).password:
        raise ValueError(
            "MLFLOW_TRACKING_URI holds a password: give the bare URL and set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
        )


def configure(repo_root: str | Path) -> str:
    """Point MLflow at the store and experiment; returns the tracking URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(repo_root)
    check_no_secret(uri)
    mlflow.set_tracking_uri(uri)
    with server_errors(uri):
        experiment = mlflow.set_experiment(
            os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        )
        # Only when missing: on a shared server a teammate may read but not edit the experiment.
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
    return uri


@contextlib.contextmanager
def server_errors(uri: str) -> Iterator[None]:
    """Name the tracking server in any failure talking to it (down, killed, refused the login)."""
    if urlsplit(uri).scheme not in ("http", "https"):
        yield
        return
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.RequestException) as error:
        raise RuntimeError(f"MLflow tracking server {uri} failed: {error}") from error


def pipeline_written(repo_root: str | Path) -> set[str]:
    """Tracked paths the pipeline writes itself: dvc.lock and every stage's outs, metrics, plots.

    params.yaml is in the set too: a run names its changed values instead.
    """
    written = {"dvc.lock", "params.yaml"}
    dvc_yaml = Path(repo_root) / "dvc.yaml"
    if dvc_yaml.exists():
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
        for stage in stages.values():
            for kind in ("outs", "metrics", "plots"):
                for entry in stage.get(kind) or []:
                    written.add(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return {path.rstrip("/") for path in written}


def source_edits(repo_root: str | Path) -> list[str] | None:
    """Tracked files that differ from HEAD, less what the pipeline writes; None outside git.

    A fresh clone's first `make repro` rewrites dvc.lock and the reports DVC
    keeps in git: that is the pipeline at work, not an edit to the code.
    """
    try:
        changed = subprocess.run(
            ["git", "diff", "--name-only", "--relative", "HEAD", "--"],
            cwd=repo_root, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    written = pipeline_written(repo_root)

    def by_pipeline(path: str) -> bool:
        return any(path == out or path.startswith(out + "/") for out in written)

    return sorted(path for path in changed if not by_pipeline(path))


def git_commit(repo_root: str | Path) -> str:
    """HEAD's commit id, with `-dirty` when source files differ from it; 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if source_edits(repo_root) else sha


def dvc_output_hashes(lock_file: str | Path, paths: list[str]) -> dict[str, str]:
    """md5s that `dvc.lock` records for the given outputs (those not locked yet are left out)."""
    lock_file = Path(lock_file)
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    found = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") in paths and "md5" in out:
                found[out["path"]] = out["md5"]
    return found


def changed_params(repo_root: str | Path, params: dict[str, Any]) -> dict[str, Any]:
    """Flattened params that differ from HEAD's params.yaml ({} outside git or when equal)."""
    try:
        committed_text = subprocess.run(
            ["git", "show", "HEAD:params.yaml"],
            cwd=repo_root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    committed = flatten(yaml.safe_load(committed_text) or {})
    current = flatten(params)
    return {k: v for k, v in current.items() if committed.get(k, object()) != v}


def run_name(repo_root: str | Path, params: dict[str, Any]) -> str:
    """A name to find the run by: `<DVC experiment or commit> key=value ... (edited a.py, b.py)`.

    The params listed are those that differ from HEAD's params.yaml; the files
    are the edited source files (`source_edits`), the first EDITS_NAMED by name.
    """
    commit = git_commit(repo_root)
    head = "nogit" if commit == "unknown" else commit[:7]
    parts = [os.environ.get("DVC_EXP_NAME") or head]
    parts += [f"{k}={v}" for k, v in sorted(changed_params(repo_root, params).items())]
    edits = source_edits(repo_root) or []
    if edits:
        named = ", ".join(Path(path).name for path in edits[:EDITS_NAMED])
        more = f" +{len(edits) - EDITS_NAMED} more" if len(edits) > EDITS_NAMED else ""
        parts.append(f"(edited {named}{more})")
    name = " ".join(parts)
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 3] + "..."


def experiment_url(tracking_uri_: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of an experiment (or one of its runs), in the training view.

    An http(s) tracking URI is the UI too; any other store is served by
    `mlflow ui`, at DEFAULT_UI unless told otherwise.
    """
    base = tracking_uri_ if urlsplit(tracking_uri_).scheme in ("http", "https") else DEFAULT_UI
    page = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    if run_id:
        page += f"/runs/{run_id}"
    return page + "?" + urlencode(TRAINING_VIEW)


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes: the hash `dvc.lock` records for a file output."""
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_split(table_path: str | Path, split: str, source: str) -> None:
    """One split of the caption table as a dataset input of the active run, context = the split.

    `source` is the path as dvc.yaml names it, the same in every clone. The
    digest is MLflow's, of the split's rows; the input's `dvc_md5` tag is the
    whole table's md5, its key in the DVC cache and remote.
    """
    import pandas as pd

    table = pd.read_parquet(table_path)
    rows = table[table["split"] == split].reset_index(drop=True)
    dataset = mlflow.data.from_pandas(rows, source=source, name=f"{Path(source).stem}-{split}")
    mlflow.log_input(dataset, context=split, tags={"dvc_md5": file_md5(table_path)})


def run_tags(repo_root: str | Path, data_hashes: dict[str, str]) -> dict[str, str]:
    """The tags every run carries, so runs are comparable and traceable."""
    tags = {
        "git_commit": git_commit(repo_root),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
    }
    edits = source_edits(repo_root)
    if edits:
        tags["git_edits"] = ", ".join(edits)[:5000]  # MLflow's tag values stop at 8000
    for path, md5 in sorted(data_hashes.items()):
        tags[f"data_hash.{path}"] = md5
    if data_hashes:
        tags["data_hash"] = "+".join(md5[:8] for _, md5 in sorted(data_hashes.items()))
    return tags


def save_run_ref(path: str | Path, run: Any, key: str = "") -> None:
    """Leave the run id where the next stage (evaluate) finds it; `key` names its settings."""
    ref = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "key": key}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(ref, indent=2) + "\n")


def resume_run(
    path: str | Path, unfinished_only: bool = False, key: str | None = None
) -> str | None:
    """The run id saved by `save_run_ref` if that run exists in the current store.

    unfinished_only: only a run that did not end cleanly (killed, failed);
    key: only a run saved with the same settings key.
    """
    path = Path(path)
    if not path.exists():
        return None
    ref = json.loads(path.read_text())
    if key is not None and ref.get("key") != key:
        return None
    run_id = ref.get("run_id")
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.get_run(run_id)
    except MlflowException as error:
        # A run from another store is simply not resumable; a server that is down or
        # refuses the login is an error, not a reason to start a fresh run.
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    if unfinished_only and run.info.status == "FINISHED":
        return None
    return run_id


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as `section.key` names (MLflow params are flat strings)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class EpochLogger(keras.callbacks.Callback):
    """Logs each epoch's Keras metrics (loss, val_loss, ...) to the active MLflow run.

    The step is the caption pairs seen so far (`pairs_seen`, which the
    checkpoint callback adds before this one runs), so runs on data sets of
    different sizes, or with different epoch lengths, line up in the MLflow UI.
    """

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        mlflow.log_metrics(metrics, step=int(metrics.get("pairs_seen", epoch + 1)))
