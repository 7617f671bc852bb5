"""Deployment artifacts of a registered version: the TF SavedModel and the MLflow Dockerfile.

A tiny untrained captioner goes through the real `register` stage into a
sqlite registry (the `Project` of test_serving); the test then follows the
recipe in docs/serving.md: the version's `savedmodel` tag leads to the SavedModel
artifact, and `mlflow models generate-dockerfile -m
models:/image-captioner@champion` (the Makefile's `docker` target) writes a
Dockerfile with the champion's files beside it. Building the image
(`mlflow models build-docker`) needs a Docker daemon and base images from a
registry, which this machine has not; the Dockerfile is what can be checked
offline.
"""

from __future__ import annotations

import re
import subprocess

import mlflow
import pytest
import yaml

from test_serving import VENV_BIN, Project, tiny_untrained_model

MODEL_URI = "models:/image-captioner@champion"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_captioner):
    root = tmp_path_factory.mktemp("deploy")
    model = tiny_untrained_model(tiny_captioner, root / "tiny.keras")
    image = root / "one.png"
    image.write_bytes(b"")  # the stage reads the table's paths, not the pixels
    project = Project(root / "project", [image] * 4, max_batch=4)
    result, stdout = project.register(model, cider=0.5)
    assert result["alias"] == "champion", stdout
    return project, result


@pytest.mark.slow
def test_registered_version_carries_the_savedmodel(registered, tmp_path):
    project, result = registered
    client = mlflow.MlflowClient(project.uri)
    version = client.get_model_version(result["name"], result["version"])
    uri = version.tags["savedmodel"]
    assert uri == f"runs:/{result['run_id']}/savedmodel"
    local = mlflow.artifacts.download_artifacts(
        uri, dst_path=str(tmp_path), tracking_uri=project.uri
    )
    assert sorted(p.name for p in tmp_path.joinpath("savedmodel").iterdir()) == sorted(
        p.name for p in (project.root / "models" / "savedmodel").iterdir()
    )
    assert (tmp_path / "savedmodel" / "saved_model.pb").is_file(), local


@pytest.mark.slow
def test_generate_dockerfile_for_the_champion(registered, tmp_path):
    project, result = registered
    out = tmp_path / "docker"
    done = subprocess.run(
        [str(VENV_BIN / "mlflow"), "models", "generate-dockerfile", "-m", MODEL_URI]
        + ["-d", str(out)],
        cwd=project.root, env=project.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    dockerfile = (out / "Dockerfile").read_text()
    # The image copies the champion's files in and serves them with MLflow's pyfunc server.
    copied = re.search(r"^COPY (\S+) /opt/ml/model", dockerfile, re.MULTILINE)
    assert copied, dockerfile
    model_dir = out / copied.group(1)
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())
    # The champion's own files: its logged-model id is the one registered.json names.
    assert result["model_uri"].endswith(flavor["model_id"]), (result["model_uri"], flavor)
    assert (model_dir / "served_model.py").is_file()
    assert (model_dir / "code" / "captioning" / "serving" / "pyfunc.py").is_file()
    # The image installs the model's pinned requirements and starts MLflow's scoring server.
    assert "tensorflow-cpu==" in (model_dir / "requirements.txt").read_text()
    assert "_install_pyfunc_deps('/opt/ml/model'" in dockerfile
    assert re.search(r"^ENTRYPOINT .*mlflow.models import container", dockerfile, re.MULTILINE)
