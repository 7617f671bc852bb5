"""The MLflow UI in a real browser: the links the project prints open the training view.

MLflow 3.17's UI opens every experiment on its GenAI pages (Overview, Traces,
Judges) unless the page's `workflowType` parameter, or the sidebar switch a
browser remembers, asks for the training view; the experiment's kind tag no
longer decides. One `mlflow server` on a loopback port and headless Chromium
with a fresh profile, as a new user has it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from captioning.server_process import ServerProcess, free_port, http_ok
from captioning.tracking import runs as tracking
from captioning.tracking import sweeps

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on sqlite with one sweep: a parent run and a nested training run."""
    root = tmp_path_factory.mktemp("ui")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no GenAI job runner
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    command = [
        Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root", str(root / "artifacts"),
    ]  # fmt: skip
    with ServerProcess(command, http_ok(f"{url}/health"), root / "server.log", env=env):
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = url
        try:
            tracking.configure(root)
            parent = sweeps.open_sweep(root, "-S train.seed=1,2")
            with mlflow.start_run(run_name="seed-one train.seed=1", parent_run_id=parent) as run:
                mlflow.log_metric("val_CIDEr", 0.5, step=16)
            sweeps.close_sweep(root, parent, 0)
            yield url, run.info.experiment_id, mlflow.MlflowClient().get_run(parent).info.run_name
        finally:
            mlflow.set_tracking_uri(None)
            # tracking.configure's set_experiment left this server's experiment active.
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
            mlflow.tracking.fluent._active_experiment_id = None
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous


def _rendered(url: str, profile: Path) -> str:
    """The page's DOM once the app has rendered, in a fresh browser profile."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,900",
        "--virtual-time-budget=20000", "--dump-dom", url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


def test_the_printed_link_opens_the_runs_table_not_the_genai_overview(server, tmp_path):
    url, experiment_id, parent_name = server
    link = tracking.experiment_url(url, experiment_id)
    dom = _rendered(link, tmp_path / "fresh")
    assert parent_name in dom, dom[-2000:]  # the sweep's row in the runs table
    assert "Model registry" in dom
    assert "Judges" not in dom and "Detect Issues" not in dom
    # The same experiment without the parameter: what a new user saw before.
    bare = _rendered(link.split("?")[0], tmp_path / "bare")
    assert "Judges" in bare and parent_name not in bare
