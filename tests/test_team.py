"""The team set-up end to end: the pipeline against a real team server and an SSH DVC remote.

One module-scoped set of servers on 127.0.0.1 (PostgreSQL + `mlflow server`
with basic auth and proxied artifacts, via `captioning.tracking.team_server`; an
OpenSSH server as the DVC remote) and one tiny demo pipeline reproduced
against them as user alice and pushed. The checks then read that one run:
a second clone pulls and is up to date with byte-identical outputs; the
champion is served through the server; logins are required and a second
user cannot change alice's experiment; no password is found in anything
DVC or MLflow recorded. The fault tests come last because they change the
project: an interrupted `dvc push` re-run, the tracking server SIGKILLed
during training, and two queued experiments run in parallel.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import mlflow
import pytest
import requests
import yaml
from benchmarks.scoring_server import ScoringServer

from pipeline_fixtures import VENV_BIN, Project, declared_outputs, describe, make_project
from team_fixtures import (
    SshRemote,
    TeamServer,
    User,
    missing_programs,
    postgres_reachable_dir,
    running_ssh_remote,
    running_team_server,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(missing_programs()), reason=f"needs {missing_programs()} (.ci/run installs them)"
    ),
]

EXPERIMENT = "image-captioning"
# A client that gives up quickly on a dead server: the fault test waits on it.
FAST_FAILING_CLIENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
}
UP_TO_DATE = "Data and pipelines are up to date."


class Team(NamedTuple):
    server: TeamServer
    remote: SshRemote
    alice: User
    bob: User


class Pushed(NamedTuple):
    project: Project
    log: str  # the `dvc repro` output
    commit: str  # what `dvc repro` ran on


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[Team]:
    state = postgres_reachable_dir("captioning-team-")
    try:
        with (
            running_team_server(state / "server") as server,
            running_ssh_remote(tmp_path_factory.mktemp("ssh")) as remote,
        ):
            yield Team(server, remote, server.add_user("alice"), server.add_user("bob"))
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _clone_env(project: Project, team: Team, user: User) -> dict[str, str]:
    return {**project.env, **user.env(team.server.url), **team.remote.client_env()}


@pytest.fixture(scope="module")
def pushed(team, tmp_path_factory) -> Pushed:
    """The tiny demo pipeline reproduced by alice against the server, committed and pushed."""
    project = make_project(tmp_path_factory.mktemp("alice"))
    project.env.update(_clone_env(project, team, team.alice), **FAST_FAILING_CLIENT)
    project.tracking_uri = team.server.url
    project.dvc("remote", "add", "-d", "team", team.remote.url())
    project.dvc("remote", "modify", "--local", "team", "keyfile", team.remote.key)
    project.commit_all("the team's DVC remote")
    commit = project.head()
    done = project.dvc("repro")
    project.commit_all("pipeline outputs")
    project.dvc("push")
    return Pushed(project, done.stdout + done.stderr, commit)


@contextlib.contextmanager
def logged_in(user: User, url: str) -> Iterator[mlflow.MlflowClient]:
    """An MlflowClient that sends `user`'s login (MLflow reads it from the environment)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user.name, MLFLOW_TRACKING_PASSWORD=user.password)
    try:
        yield mlflow.MlflowClient(tracking_uri=url)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _runs(client: mlflow.MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _files(root: Path, paths: list[str]) -> dict[str, bytes]:
    found = {}
    for path in paths:
        target = root / path
        members = sorted(target.rglob("*")) if target.is_dir() else [target]
        for member in members:
            if member.is_file():
                found[str(member.relative_to(root))] = member.read_bytes()
    return found


def _clone(pushed: Pushed, team: Team, dest: Path, remote: str | None = None) -> Project:
    """A teammate's clone: git clone, their own key for the remote, `dvc pull`."""
    source = pushed.project
    subprocess.run(["git", "clone", "-q", str(source.root), str(dest)], check=True)
    clone = Project(dest, _clone_env(source, team, team.bob), team.server.url)
    clone.dvc("remote", "modify", "--local", "team", "keyfile", team.remote.key)
    if remote:
        clone.dvc("remote", "add", "--local", remote, team.remote.url(remote))
        clone.dvc("remote", "modify", "--local", remote, "keyfile", team.remote.key)
    clone.dvc("pull", *(["-r", remote] if remote else []))
    return clone


def _assert_same_outputs(first: Project, second: Project) -> None:
    outputs = declared_outputs(first.root / "dvc.yaml")
    mine, theirs = _files(first.root, outputs), _files(second.root, outputs)
    assert sorted(theirs) == sorted(mine)
    differing = [path for path in mine if mine[path] != theirs[path]]
    assert not differing, f"outputs differ after dvc pull: {differing}"


# --- the pipeline against the server, and a teammate's clone -----------------------------------


def test_the_pipeline_logs_a_findable_run_to_the_server(pushed, team):
    with logged_in(team.alice, team.server.url) as client:
        (run,) = _runs(client)
        experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.status == "FINISHED"
    assert run.info.run_name == pushed.commit[:7], run.info.run_name  # params as committed
    assert "test.CIDEr" in run.data.metrics and "train.budget_pairs" in run.data.params
    # Each split is an input named by its context, tagged with the table's DVC md5.
    lock = yaml.safe_load((pushed.project.root / "dvc.lock").read_text())
    table_md5 = next(
        out["md5"]
        for out in lock["stages"]["validate"]["outs"]
        if out["path"] == "data/interim/captions.parquet"
    )
    inputs = {
        tags["mlflow.data.context"]: (logged.dataset.name, tags["dvc_md5"])
        for logged in run.inputs.dataset_inputs
        for tags in [{t.key: t.value for t in logged.tags}]
    }
    assert inputs == {split: (f"captions-{split}", table_md5) for split in ("train", "val", "test")}
    # The model's files went through the server (proxied artifacts), not to the client's disk.
    assert any(team.server.layout.artifacts.rglob("*.keras")), "no model in the artifact store"


def test_a_teammates_clone_pulls_everything_and_is_up_to_date(pushed, team, tmp_path):
    clone = _clone(pushed, team, tmp_path / "bob")
    status = clone.dvc("status")
    assert UP_TO_DATE in status.stdout, status.stdout
    _assert_same_outputs(pushed.project, clone)


def test_the_champion_is_served_through_the_server(pushed, team, tmp_path):
    env = {**team.bob.env(team.server.url), "MLFLOW_DISABLE_TELEMETRY": "true"}
    image = next((pushed.project.root / "data" / "raw").rglob("*.jpg")).read_bytes()
    with ScoringServer(
        "models:/image-captioner@champion", log_path=tmp_path / "serve.log", env=env
    ) as served:
        response = requests.post(
            f"{served.url}/invocations",
            json={"inputs": [base64.b64encode(image).decode("ascii")]},
            timeout=300,
        )
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["caption"].strip(), prediction


# --- logins and permissions ---------------------------------------------------------------------


def test_requests_without_a_valid_login_get_401(pushed, team):
    url = f"{team.server.url}/api/2.0/mlflow/experiments/search"
    assert requests.get(url, params={"max_results": 1}, timeout=30).status_code == 401
    wrong = (team.alice.name, team.alice.password + "x")
    assert requests.get(url, params={"max_results": 1}, auth=wrong, timeout=30).status_code == 401
    right = requests.get(url, params={"max_results": 1}, auth=team.alice.auth, timeout=30)
    assert right.status_code == 200, right.text


def test_a_second_user_can_read_but_not_change_the_first_users_experiment(pushed, team):
    api = f"{team.server.url}/api/2.0/mlflow"
    with logged_in(team.alice, team.server.url) as client:
        experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    read = requests.get(
        f"{api}/experiments/get", params={"experiment_id": experiment_id}, auth=team.bob.auth
    )
    assert read.status_code == 200, read.text
    changes = [
        ("experiments/update", {"experiment_id": experiment_id, "new_name": "bobs-now"}),
        (
            "experiments/set-experiment-tag",
            {"experiment_id": experiment_id, "key": "k", "value": "v"},
        ),
        ("runs/create", {"experiment_id": experiment_id}),
        ("experiments/delete", {"experiment_id": experiment_id}),
    ]
    for endpoint, body in changes:
        refused = requests.post(f"{api}/{endpoint}", json=body, auth=team.bob.auth, timeout=30)
        assert refused.status_code == 403, (endpoint, refused.status_code, refused.text)
    with logged_in(team.alice, team.server.url) as client:
        assert client.get_experiment(experiment_id).name == EXPERIMENT


def test_no_password_in_params_lock_reports_logs_or_mlflow_records(pushed, team):
    root = pushed.project.root
    recorded = [pushed.log, (root / "params.yaml").read_text(), (root / "dvc.lock").read_text()]
    for folder in ("reports", ".dvc", "models"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000 and "cache" not in path.parts:
                recorded.append(path.read_bytes().decode("latin-1"))
    recorded.append(pushed.project.git("log", "-p", "--all").stdout)
    with logged_in(team.server.admin, team.server.url) as client:
        for run in _runs(client):
            recorded += [str(run.data.params), str(run.data.tags), run.info.run_name]
    text = "\n".join(recorded)
    for user in (team.server.admin, team.alice, team.bob):
        assert user.password not in text, f"{user.name}'s password was recorded"


# --- faults -------------------------------------------------------------------------------------


def test_an_interrupted_push_rerun_leaves_the_remote_complete(pushed, team, tmp_path):
    project = pushed.project
    project.dvc("remote", "add", "--local", "second", team.remote.url("second"))
    project.dvc("remote", "modify", "--local", "second", "keyfile", team.remote.key)
    objects = team.remote.storage / "second" / "files" / "md5"
    push = subprocess.Popen(
        [str(VENV_BIN / "dvc"), "push", "-r", "second", "--jobs", "1"],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while push.poll() is None and time.monotonic() < deadline:
        if objects.is_dir() and sum(1 for p in objects.rglob("*") if p.is_file()) >= 3:
            os.killpg(push.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    push.wait()
    assert push.returncode == -signal.SIGKILL, "dvc push ended before it could be interrupted"
    incomplete = project.dvc("status", "--cloud", "-r", "second", check=False)
    assert "new:" in incomplete.stdout, incomplete.stdout

    project.dvc("push", "-r", "second")
    complete = project.dvc("status", "--cloud", "-r", "second")
    assert "Cache and remote 'second' are in sync" in complete.stdout, complete.stdout
    clone = _clone(pushed, team, tmp_path / "fresh", remote="second")
    assert UP_TO_DATE in clone.dvc("status").stdout
    _assert_same_outputs(project, clone)


def test_the_server_killed_during_training_fails_the_stage_and_the_next_repro_completes(
    pushed, team
):
    project = pushed.project
    with logged_in(team.alice, team.server.url) as client:
        before = {r.info.run_id: (r.data.params, r.data.metrics) for r in _runs(client)}
    params = project.params()
    params["train"]["seed"] += 1
    (project.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    repro = subprocess.Popen(
        [str(VENV_BIN / "dvc"), "repro"],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        new_run = _wait_for_new_run(team, set(before), repro)
        team.server.process.kill()  # SIGKILL the whole `mlflow server` group mid-run
        log, _ = repro.communicate(timeout=600)
    finally:
        if repro.poll() is None:
            os.killpg(repro.pid, signal.SIGKILL)
    assert repro.returncode != 0, log[-3000:]
    assert f"MLflow tracking server {team.server.url}" in log, log[-3000:]

    team.server.start()
    with logged_in(team.alice, team.server.url) as client:
        after = {r.info.run_id: (r.data.params, r.data.metrics) for r in _runs(client)}
    for run_id, recorded in before.items():
        assert after[run_id] == recorded, f"run {run_id} changed across the kill"
    done = project.dvc("repro")
    assert "Running stage 'train'" in done.stdout, describe(done)
    with logged_in(team.alice, team.server.url) as client:
        resumed = client.get_run(new_run)
        assert resumed.info.status == "FINISHED"
        assert len(_runs(client)) == len(before) + 1  # the killed run was continued, not doubled
    project.commit_all("seed + 1")


def _wait_for_new_run(team: Team, known: set[str], repro: subprocess.Popen) -> str:
    """The id of the first run the pipeline opens that is not in `known`."""
    deadline = time.monotonic() + 600
    with logged_in(team.alice, team.server.url) as client:
        while time.monotonic() < deadline:
            assert repro.poll() is None, repro.stdout.read()[-3000:]
            fresh = [r.info.run_id for r in _runs(client) if r.info.run_id not in known]
            if fresh:
                return fresh[0]
            time.sleep(0.5)
    raise TimeoutError("the pipeline opened no MLflow run within 600 s")


def test_queued_experiments_run_in_parallel_each_logged_once(pushed, team):
    project = pushed.project
    names = ["team-seed-a", "team-seed-b"]
    for offset, name in enumerate(names, start=10):
        project.dvc("exp", "run", "--queue", "-n", name, "-S", f"train.seed={offset}")
    project.dvc("exp", "run", "--run-all", "--jobs", "2")
    with logged_in(team.alice, team.server.url) as client:
        runs = _runs(client)
    by_name = {}
    for run in runs:
        by_name.setdefault(run.data.tags.get("dvc_experiment"), []).append(run)
    for offset, name in enumerate(names, start=10):
        assert len(by_name.get(name, [])) == 1, f"{name}: {len(by_name.get(name, []))} runs"
        (run,) = by_name[name]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{name} train.seed={offset}"
        assert "test.CIDEr" in run.data.metrics
