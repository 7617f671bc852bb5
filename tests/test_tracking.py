"""Where runs are stored: the repository's mlflow.db, also from a queued DVC experiment."""

from pathlib import Path

from captioning import tracking


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
