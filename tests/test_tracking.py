"""Where runs are stored (the repository's mlflow.db, also from a queued DVC experiment) and what
every run records: a readable name, the training data, the experiment kind, and no secrets."""

import hashlib
import json
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from captioning.server_process import free_port
from captioning.tracking import runs as tracking


def test_runs_go_to_the_repository_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_a_queued_experiment_copy_logs_to_the_repository_it_came_from(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    assert tracking.project_root(copy) == (tmp_path / "repo").resolve()
    assert tracking.tracking_uri(copy) == f"sqlite:///{(tmp_path / 'repo').resolve() / 'mlflow.db'}"
    # Only that exact layout: a folder merely named like it elsewhere is left alone.
    other = tmp_path / "exps" / "tmp"
    other.mkdir(parents=True)
    assert tracking.project_root(other) == other.resolve()


def test_the_environment_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert tracking.tracking_uri(Path(tmp_path)) == "sqlite:////elsewhere/mlflow.db"


# --- what a run records: a readable name, the training data, no secrets ------------------------


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def test_run_name_is_the_dvc_experiment_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "sleek-lamb")
    assert tracking.run_name(tmp_path, {"train": {"epochs": 3}}) == "sleek-lamb"


def test_run_name_is_the_commit_and_what_changed(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = {"train": {"epochs": 15, "seed": 42}, "data": {"source": "demo"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "params.yaml")
    _git(tmp_path, "commit", "-qm", "params")
    short = tracking.git_commit(tmp_path)[:7]
    assert tracking.run_name(tmp_path, params) == short
    params["train"]["epochs"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert tracking.run_name(tmp_path, params) == f"{short}-dirty train.epochs=3"
    assert tracking.run_name(tmp_path / "nowhere", params).startswith("nogit")


def test_a_tracking_uri_with_a_password_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2-secret@127.0.0.1:5000")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD") as refused:
        tracking.configure(tmp_path)
    assert "hunter2" not in str(refused.value)
    tracking.check_no_secret("http://alice@127.0.0.1:5000")  # a user name alone is no secret


def test_the_experiment_opens_on_training_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kind-test")
    tracking.configure(tmp_path)
    experiment = mlflow.get_experiment_by_name("kind-test")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


def test_the_caption_table_is_the_runs_training_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dataset-test")
    table = tmp_path / "captions.parquet"
    pd.DataFrame(
        {
            "image_id": [1, 2],
            "path": ["a.jpg", "b.jpg"],
            "caption": ["a", "b"],
            "split": ["train"] * 2,
        }
    ).to_parquet(table)
    tracking.configure(tmp_path)
    with mlflow.start_run() as run:
        tracking.log_training_data(table, source="data/interim/captions.parquet")
    (logged,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "captions"
    assert logged.dataset.digest == hashlib.md5(table.read_bytes()).hexdigest()
    assert "data/interim/captions.parquet" in logged.dataset.source
    assert [t.value for t in logged.tags if t.key == "mlflow.data.context"] == ["training"]


def test_an_unreachable_server_is_an_error_naming_it_not_a_fresh_run(tmp_path, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    ref = tmp_path / "mlflow_run.json"
    ref.write_text(json.dumps({"run_id": "0" * 32, "experiment_id": "1", "key": ""}))
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        named = pytest.raises(RuntimeError, match=f"MLflow tracking server http://127.0.0.1:{port}")
        with named, tracking.server_errors(f"http://127.0.0.1:{port}"):
            tracking.resume_run(ref)
    finally:
        mlflow.set_tracking_uri(None)
