"""Where runs are stored (the repository's mlflow.db, also from a queued DVC experiment) and what
every run records: a readable name, each data split it read, the experiment kind, its place in a
sweep, and no secrets."""

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
from captioning.tracking import sweeps


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


def _committed_project(repo: Path, params: dict) -> None:
    """A git repo as a fresh clone has it: params, dvc.yaml, dvc.lock and a git-kept report."""
    stages = {
        "train": {"cmd": "true", "outs": ["models/m.keras", {"dvclive/plots": {"cache": False}}]},
        "evaluate": {"cmd": "true", "metrics": [{"reports/metrics.json": {"cache": False}}]},
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "reports").mkdir()
    (repo / "reports" / "metrics.json").write_text("{}\n")
    (repo / "dvclive" / "plots").mkdir(parents=True)
    (repo / "dvclive" / "plots" / "loss.tsv").write_text("step\tloss\n")
    (repo / "src").mkdir()
    (repo / "src" / "model.py").write_text("x = 1\n")
    (repo / "src" / "fit.py").write_text("y = 1\n")
    (repo / "src" / "data.py").write_text("z = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "project")


def test_run_name_is_the_dvc_experiment_name_and_its_params(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "sleek-lamb")
    params = {"train": {"epochs": 15}}
    _committed_project(tmp_path, params)
    assert tracking.run_name(tmp_path, params) == "sleek-lamb"
    params["train"]["epochs"] = 3  # what `dvc exp run -S train.epochs=3` writes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert tracking.run_name(tmp_path, params) == "sleek-lamb train.epochs=3"


def test_what_the_pipeline_writes_does_not_make_a_run_dirty(tmp_path, monkeypatch):
    """A fresh clone's first `make repro` rewrites dvc.lock and git-kept reports: still clean."""
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = {"train": {"epochs": 15, "seed": 42}, "data": {"source": "demo"}}
    _committed_project(tmp_path, params)
    sha = tracking.git_commit(tmp_path)
    assert len(sha) == 40 and tracking.run_name(tmp_path, params) == sha[:7]
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (tmp_path / "reports" / "metrics.json").write_text('{"CIDEr": 1.0}\n')
    (tmp_path / "dvclive" / "plots" / "loss.tsv").write_text("step\tloss\n16\t2.0\n")
    assert tracking.source_edits(tmp_path) == []
    assert tracking.git_commit(tmp_path) == sha
    assert tracking.run_name(tmp_path, params) == sha[:7]
    assert "git_edits" not in tracking.run_tags(tmp_path, {})
    params["train"]["epochs"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert tracking.run_name(tmp_path, params) == f"{sha[:7]} train.epochs=3"
    assert tracking.run_name(tmp_path / "nowhere", params).startswith("nogit")


def test_edited_source_files_are_named_in_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = {"train": {"epochs": 15}}
    _committed_project(tmp_path, params)
    sha = tracking.git_commit(tmp_path)
    (tmp_path / "src" / "model.py").write_text("x = 2\n")
    assert tracking.run_name(tmp_path, params) == f"{sha[:7]} (edited model.py)"
    assert tracking.git_commit(tmp_path) == f"{sha}-dirty"
    for name in ("fit.py", "data.py"):
        (tmp_path / "src" / name).write_text("changed = True\n")
    assert tracking.run_name(tmp_path, params) == f"{sha[:7]} (edited data.py, fit.py +1 more)"
    tags = tracking.run_tags(tmp_path, {})
    assert tags["git_edits"] == "src/data.py, src/fit.py, src/model.py"
    assert tags["git_commit"] == f"{sha}-dirty"


def test_a_tracking_uri_with_a_password_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2-secret@127.0.0.1:5000")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD") as refused:
        tracking.configure(tmp_path)
    assert "hunter2" not in str(refused.value)
    tracking.check_no_secret("http://alice@127.0.0.1:5000")  # a user name alone is no secret


def test_the_experiment_is_tagged_as_model_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kind-test")
    tracking.configure(tmp_path)
    experiment = mlflow.get_experiment_by_name("kind-test")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


def test_experiment_links_ask_for_the_training_view():
    local = tracking.experiment_url("sqlite:////repo/mlflow.db", "3", "abc")
    assert local == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    team = tracking.experiment_url("https://mlflow.example.org/", "7")
    assert team == "https://mlflow.example.org/#/experiments/7?workflowType=machine_learning"


def test_each_split_is_a_dataset_input_with_its_name_as_context(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dataset-test")
    table = tmp_path / "captions.parquet"
    pd.DataFrame(
        {
            "image_id": [1, 2, 3, 4],
            "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
            "caption": ["a", "b", "c", "d"],
            "split": ["train", "train", "val", "test"],
        }
    ).to_parquet(table)
    tracking.configure(tmp_path)
    with mlflow.start_run() as run:
        for split in ("train", "val"):
            tracking.log_split(table, split, source="data/interim/captions.parquet")
    with mlflow.start_run(run_id=run.info.run_id):  # evaluate reopens the run
        tracking.log_split(table, "test", source="data/interim/captions.parquet")
        tracking.log_split(
            table, "test", source="data/interim/captions.parquet"
        )  # re-run: kept once
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs
    }
    assert sorted(by_context) == ["test", "train", "val"] and len(inputs) == 3
    md5 = hashlib.md5(table.read_bytes()).hexdigest()
    for split, logged in by_context.items():
        assert logged.dataset.name == f"captions-{split}"
        assert "data/interim/captions.parquet" in logged.dataset.source
        assert {t.key: t.value for t in logged.tags}["dvc_md5"] == md5
        rows = json.loads(logged.dataset.profile)["num_rows"]
        assert rows == {"train": 2, "val": 1, "test": 1}[split]
    assert by_context["train"].dataset.digest != by_context["test"].dataset.digest


def test_a_sweep_is_a_parent_run_with_its_training_runs_nested(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep-test")
    monkeypatch.delenv(sweeps.SWEEP_RUN_ENV, raising=False)
    assert sweeps.parent_run_id() is None  # outside a sweep: a top-level run
    parent = sweeps.open_sweep(tmp_path, "-S 'train.seed=1,2'")
    monkeypatch.setenv(sweeps.SWEEP_RUN_ENV, parent)
    children = []
    for seed in (1, 2):
        with mlflow.start_run(run_name=f"seed {seed}", parent_run_id=sweeps.parent_run_id()) as run:
            children.append(run.info.run_id)
    client = mlflow.MlflowClient()
    assert client.get_run(parent).info.status == "RUNNING"  # until every experiment ran
    sweeps.close_sweep(tmp_path, parent, exit_code=0)
    opened = client.get_run(parent)
    assert opened.info.status == "FINISHED"
    assert opened.info.run_name == "sweep nogit -S 'train.seed=1,2'"
    assert opened.data.tags["sweep_grid"] == "-S 'train.seed=1,2'"
    nested = client.search_runs(
        [opened.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_id for r in nested) == sorted(children)
    failed = sweeps.open_sweep(tmp_path, "")
    sweeps.close_sweep(tmp_path, failed, exit_code=2)
    assert client.get_run(failed).info.status == "FAILED"


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


@pytest.mark.slow
def test_queued_experiments_of_a_sweep_nest_under_its_parent_run(tmp_path):
    """`make sweep`'s steps on a one-stage DVC project: open, `dvc exp run --run-all`, close."""
    import os
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("seed: 0\n")
    (repo / "train.py").write_text(
        "import mlflow, yaml\n"
        "from captioning.tracking import runs, sweeps\n"
        "runs.configure('.')\n"
        "seed = yaml.safe_load(open('params.yaml'))['seed']\n"
        "with mlflow.start_run(run_name=f'seed {seed}', parent_run_id=sweeps.parent_run_id()):\n"
        "    mlflow.log_metric('seed', seed)\n"
        "open('done.json', 'w').write('{\"ok\": 1}')\n"
    )
    stage = {"cmd": "python train.py", "deps": ["train.py"], "params": ["seed"]}
    stage["metrics"] = [{"done.json": {"cache": False}}]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "queued-sweep",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop(sweeps.SWEEP_RUN_ENV, None)

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    dvc = str(Path(sys.executable).parent / "dvc")
    _git(repo, "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "config", "core.analytics", "false")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "sweepable")
    module = [sys.executable, "-m", "captioning.tracking.sweeps"]
    # One queued experiment: what it shows is that the id reaches the queue's worker.
    run(dvc, "exp", "run", "--queue", "-S", "seed=3")
    parent = run(*module, "open", "--grid", "-S seed=3").strip().splitlines()[-1]
    env[sweeps.SWEEP_RUN_ENV] = parent
    run(dvc, "exp", "run", "--run-all", "--jobs", "1")
    run(*module, "close", parent, "--exit-code", "0")

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("queued-sweep")
    nested = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.data.metrics["seed"] for r in nested] == [3.0]
    assert client.get_run(parent).info.status == "FINISHED"
