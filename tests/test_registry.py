"""The model registry rules (`captioning.serving.registry`) against a real sqlite MLflow store.

A trivial model stands in for the captioner (the rules never look inside it):
the champion alias moves only to a strictly better test CIDEr on the same
evaluation set, re-registering the same run and model is a no-op, and the
evaluation-set digest changes with the images and their references.
"""

from __future__ import annotations

import os

import mlflow
import pandas as pd
import pytest

from captioning.config import check_params, load_section, read_params
from captioning.serving import registry
from pipeline_fixtures import REPO_ROOT

# A models-from-code file: the registry tests log models the way the captioner is logged.
ECHO_MODEL = """
import mlflow
import pandas as pd


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input


mlflow.models.set_model(Echo())
"""


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A fresh sqlite tracking and registry store (absolute path)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also sets this variable
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def echo_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("echo") / "echo_model.py"
    path.write_text(ECHO_MODEL)
    return path


def _register(
    client, echo_model, name, cider, eval_set="set-a", key=None, run_id=None, blocked=None
):
    """Register a trivial model from a new (or given) run with the given test CIDEr."""
    if run_id is None:
        with mlflow.start_run() as run:
            run_id = run.info.run_id

    def log_model():
        with mlflow.start_run(run_id=run_id):
            # Explicit requirements: inferring them would load the model in a subprocess.
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(echo_model), pip_requirements=["mlflow"]
            )
        return info.model_uri, info.model_id

    return registry.register_captioner(
        client,
        name,
        run_id,
        {"CIDEr": cider, "BLEU-4": 0.1},
        eval_set,
        key or run_id,
        log_model,
        blocked=blocked,
    )


def test_champion_moves_only_to_a_better_model_on_the_same_evaluation_set(client, echo_model):
    name = "captioner-rules"
    first = _register(client, echo_model, name, 0.50)
    assert (first.version, first.alias) == ("1", "champion")
    assert "no champion yet" in first.reason

    worse = _register(client, echo_model, name, 0.40)
    assert worse.alias == "challenger" and "does not beat" in worse.reason
    equal = _register(client, echo_model, name, 0.50)
    assert equal.alias == "challenger"
    other_set = _register(client, echo_model, name, 0.90, eval_set="set-b")
    assert other_set.alias == "challenger" and "different set" in other_set.reason
    assert str(registry.current_champion(client, name).version) == "1"

    better = _register(client, echo_model, name, 0.60)
    assert better.alias == "champion" and better.previous_champion == "1"
    assert str(registry.current_champion(client, name).version) == better.version
    tags = client.get_model_version(name, better.version).tags
    assert tags[registry.TAG_EVAL_SET] == "set-a" and float(tags[registry.TAG_SCORE]) == 0.60
    assert str(client.get_model_version_by_alias(name, "challenger").version) == other_set.version


def test_registering_the_same_run_and_model_twice_is_a_no_op(client, echo_model):
    name = "captioner-rerun"
    first = _register(client, echo_model, name, 0.5, key="same")
    again = _register(client, echo_model, name, 0.5, key="same", run_id=first.run_id)
    assert again.version == first.version and again.alias == "champion"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_a_run_below_the_gates_or_with_invalid_params_never_becomes_champion(client, echo_model):
    params = read_params(REPO_ROOT / "params.yaml")
    gates = load_section("gates", REPO_ROOT / "params.yaml")
    name = "captioner-gated"
    low = {"CIDEr": 0.9, "BLEU-4": 0.1}  # a CIDEr to beat anything, a BLEU-4 below its floor
    below = registry.blocking_reason(check_params(params), low, gates)
    assert below == "not eligible for champion: gate failed: BLEU-4 fail (below floor 0.2000)"
    first = _register(client, echo_model, name, 0.9, blocked=below)
    assert first.alias == "challenger" and first.reason == below
    assert registry.current_champion(client, name) is None  # not even the first version

    fine = {"CIDEr": 0.5, "BLEU-4": 0.3}
    assert registry.blocking_reason(check_params(params), fine, gates) is None
    champion = _register(client, echo_model, name, 0.5)
    assert champion.alias == "champion"

    params["train"]["budget_pairs"] = -5
    invalid = registry.blocking_reason(check_params(params), fine, gates)
    assert invalid == (
        "not eligible for champion: invalid params: train.budget_pairs = -5: allowed: a number > 0"
    )
    better = _register(client, echo_model, name, 0.95, blocked=invalid)
    assert better.alias == "challenger" and better.previous_champion == champion.version
    assert str(registry.current_champion(client, name).version) == champion.version
    tags = client.get_model_version(name, better.version).tags
    assert tags[registry.TAG_ROLE] == "challenger" and tags[registry.TAG_REASON] == invalid


def test_decide_is_strict_and_checks_what_was_measured():
    tags = {registry.TAG_EVAL_SET: "s", registry.TAG_METRIC: "CIDEr", registry.TAG_SCORE: "0.7"}
    assert registry.decide(0.71, "s", tags).alias == "champion"
    assert registry.decide(0.70, "s", tags).alias == "challenger"
    assert registry.decide(float("nan"), "s", None).alias == "challenger"
    assert "BLEU-4" in registry.decide(0.9, "s", tags, metric="BLEU-4").reason


def test_evaluation_set_digest_depends_on_images_and_references():
    table = pd.DataFrame(
        {
            "image_id": [1, 1, 2, 3],
            "caption": ["a b", "c d", "e f", "g h"],
            "split": ["test", "test", "test", "val"],
            "path": ["p"] * 4,
        }
    )
    digest = registry.evaluation_set_digest(table, "test", [2, 1])
    assert digest == registry.evaluation_set_digest(table.iloc[::-1], "test", [1, 2])
    assert digest != registry.evaluation_set_digest(table, "test", [1])
    changed = table.assign(caption=["a b", "c d", "e f!", "g h"])
    assert digest != registry.evaluation_set_digest(changed, "test", [1, 2])
    with pytest.raises(ValueError, match="not in split 'test'"):
        registry.evaluation_set_digest(table, "test", [3])


def test_model_key_changes_with_the_model_file_and_the_serving_settings(tmp_path):
    model = tmp_path / "captioner.keras"
    model.write_bytes(b"weights")
    key = registry.model_key(model, {"decoder": "greedy", "max_batch": 16})
    assert key == registry.model_key(model, {"max_batch": 16, "decoder": "greedy"})
    assert key != registry.model_key(model, {"decoder": "beam", "max_batch": 16})
    model.write_bytes(b"other weights")
    assert key != registry.model_key(model, {"decoder": "greedy", "max_batch": 16})
