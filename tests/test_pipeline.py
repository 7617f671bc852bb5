"""The DVC pipeline end to end: `dvc repro` in a throwaway git repo, real MLflow, real CLI.

One tiny demo project is reproduced once per module and then read from many
angles: every declared output exists, metrics and predictions have the agreed
shape, features are float16 shards, the MLflow run holds params, per-epoch and
test metrics, tags and artifacts, `captioning caption` agrees with evaluate,
and a second `dvc repro` has nothing to do. The experiment tests come last
because they change that project (a committed baseline, `dvc exp run -S`).
A second project runs the pipeline on a COCO-layout folder (`data.source: local`),
and a third on one that also holds the awkward files and annotations validate
quarantines or drops (grayscale, CMYK, PNG-as-.jpg, truncated, empty, blank
caption, missing file).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from captioning.features import SHARD_SUFFIX, FeatureStore, read_shard
from pipeline_fixtures import (
    BLANK_CAPTION,
    KEPT_CASES,
    PROBLEM_CASES,
    QUARANTINE_REASONS,
    REPO_ROOT,
    VENV_BIN,
    Project,
    add_problem_cases,
    coco_file_name,
    declared_outputs,
    describe,
    flatten,
    make_project,
    write_coco_folder,
)

pytestmark = pytest.mark.slow

STAGES = sorted(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])

COCO_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
HUMAN_METRICS = ("human_BLEU-4", "human_CIDEr")
EXPERIMENT = "image-captioning"


class Reproduced(NamedTuple):
    project: Project
    log: str  # stdout + stderr of the first `dvc repro`
    seconds: float


def _repro(project: Project) -> Reproduced:
    start = time.monotonic()
    done = project.dvc("repro")
    return Reproduced(project, done.stdout + done.stderr, time.monotonic() - start)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Reproduced:
    """The tiny demo pipeline, reproduced once for the whole module."""
    return _repro(make_project(tmp_path_factory.mktemp("demo")))


def _stages_run(log: str) -> list[str]:
    """Names of the stages a `dvc repro` / `dvc exp run` log says it ran, sorted."""
    return sorted(re.findall(r"Running stage '([^']+)'", log))


def _client(project: Project) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=project.tracking_uri)


def _runs(project: Project) -> list:
    client = _client(project)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no MLflow experiment {EXPERIMENT!r} in {project.tracking_uri}"
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _check_corpus_metrics(metrics: dict[str, Any], names) -> None:
    for name in names:
        assert name in metrics, f"{name} missing from metrics.json: {metrics}"
        value = metrics[name]
        assert isinstance(value, float), f"{name}={value!r} is not a float"
        assert 0.0 <= value <= 10.0, f"{name}={value} outside [0, 10]"


# --- the demo pipeline --------------------------------------------------------------------------


def test_repro_runs_every_stage_and_writes_every_declared_output(demo):
    root = demo.project.root
    assert _stages_run(demo.log) == STAGES, demo.log[-3000:]
    missing = [p for p in declared_outputs(root / "dvc.yaml") if not (root / p).exists()]
    assert not missing, f"declared in dvc.yaml but not written: {missing}"
    print(f"first dvc repro: {demo.seconds:.0f} s")


def test_metrics_json_has_every_score(demo):
    metrics = json.loads((demo.project.root / "reports" / "metrics.json").read_text())
    _check_corpus_metrics(metrics, (*COCO_METRICS, "object_accuracy", *HUMAN_METRICS))
    assert metrics["object_accuracy"] <= 1.0
    assert metrics["decoder"] == "greedy"


def test_predictions_cover_the_test_split(demo):
    root = demo.project.root
    table = pd.read_parquet(root / "data" / "interim" / "captions.parquet")
    test_ids = set(table.loc[table["split"] == "test", "image_id"].astype(int))
    assert test_ids, "the tiny demo has no test images"
    predictions = json.loads((root / "reports" / "predictions_test.json").read_text())
    assert isinstance(predictions, list)
    for p in predictions:
        assert set(p) >= {"image_id", "caption"}, p
        assert isinstance(p["image_id"], int) and isinstance(p["caption"], str), p
    ids = [p["image_id"] for p in predictions]
    assert len(ids) == len(set(ids)), "an image is captioned twice"
    assert set(ids) == test_ids


def test_features_are_float16_shards(demo):
    root = demo.project.root
    features = root / "data" / "features"
    shards = sorted(features.glob(f"*{SHARD_SUFFIX}"))
    assert shards, f"no shards in {features}: {sorted(p.name for p in features.iterdir())}"
    rows = 0
    for shard in shards:
        array = read_shard(shard)
        assert array.dtype == np.float16, (shard.name, array.dtype)
        assert array.ndim == 3 and array.shape[1:] == (64, 2048), (shard.name, array.shape)
        assert 0 < array.shape[0] <= 16, f"{shard.name}: {array.shape[0]} rows > shard_size 16"
        rows += array.shape[0]
    table = pd.read_parquet(root / "data" / "interim" / "captions.parquet")
    assert rows == table["image_id"].nunique()
    index = pd.read_parquet(features / "index.parquet")
    assert set(index["image_id"]) == set(table["image_id"])


def test_mlflow_run_has_params_metrics_tags_and_artifacts(demo):
    project = demo.project
    client = _client(project)
    runs = _runs(project)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"

    # Every params.yaml key, flattened; MLflow keeps values as strings.
    expected = {k: str(v) for k, v in flatten(project.params()).items()}
    missing = sorted(set(expected) - set(run.data.params))
    assert not missing, f"params not logged: {missing}"
    differ = {k: (v, run.data.params[k]) for k, v in expected.items() if run.data.params[k] != v}
    assert not differ, f"logged params differ from params.yaml (yaml, mlflow): {differ}"
    assert run.data.params["train.budget_pairs"] == "32"

    # One point per epoch, at the caption pairs seen (two epochs of 16).
    for name in ("loss", "val_loss", "val_CIDEr", "val_object_accuracy", "learning_rate"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [16, 32], (name, history)
    # The returned model is the best epoch by val CIDEr (train.select_by's default).
    ciders = {
        m.step // 16: m.value for m in client.get_metric_history(run.info.run_id, "val_CIDEr")
    }
    assert run.data.metrics["best_epoch"] == max(ciders, key=lambda e: (ciders[e], -e))

    metrics = json.loads((project.root / "reports" / "metrics.json").read_text())
    for name in (*COCO_METRICS, "object_accuracy", *HUMAN_METRICS):
        assert run.data.metrics.get(f"test.{name}") == pytest.approx(metrics[name], abs=1e-9), name

    head = project.head()
    assert run.data.tags.get("git_commit") == head, (
        run.data.tags,
        head,
    )  # what DVC wrote is no edit
    assert run.info.run_name == head[:7], run.info.run_name
    # CPU, memory and disk figures while it trained (sampled every 2 s here: pipeline_env).
    assert "system/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    contexts = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset.name
        for i in run.inputs.dataset_inputs
    }
    assert contexts == {"train": "captions-train", "val": "captions-val", "test": "captions-test"}
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    locked = {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if "md5" in out
    }
    for path in ("data/interim/captions.parquet", "data/features", "data/tokens"):
        assert run.data.tags.get(f"data_hash.{path}") == locked[path], path
    assert run.data.tags.get("data_hash"), run.data.tags

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"vocab.json", "metrics.json", "attention"} <= top, top
    attention = {a.path for a in client.list_artifacts(run.info.run_id, "attention")}
    assert "attention/index.html" in attention, attention


def test_convergence_shows_in_the_history_mlflow_the_log_and_the_report(demo):
    """pairs_seen and the smoothed val CIDEr in the history; the still-improving verdict agrees everywhere."""
    project = demo.project
    history = pd.read_csv(project.root / "reports" / "train_history.csv")
    assert list(history.pairs_seen) == [16, 32]
    # DVCLive's copy: one row per epoch, stepped by pairs seen, the same figures.
    live = project.root / "dvclive"
    cider_tsv = pd.read_csv(live / "plots" / "metrics" / "eval" / "CIDEr.tsv", sep="\t")
    assert cider_tsv.step.tolist() == [16, 32]
    assert cider_tsv.CIDEr.tolist() == pytest.approx(history.val_CIDEr.tolist())
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 32 and summary["train"]["loss"] == pytest.approx(
        history.loss.iloc[-1]
    )
    train = project.params()["train"]
    window, delta = train["smoothing_epochs"], train["min_delta"]
    cider = history.val_CIDEr.tolist()
    smoothed = [
        sum(cider[max(0, i + 1 - window) : i + 1]) / len(cider[max(0, i + 1 - window) : i + 1])
        for i in range(len(cider))
    ]
    assert history.val_CIDEr_smoothed.tolist() == pytest.approx(smoothed)
    # Two epochs, no early stop (its patience is longer than the run): still improving
    # exactly when the second epoch's average beats the first by more than min_delta.
    improving = smoothed[1] > smoothed[0] + delta
    (run,) = _runs(project)
    assert run.data.tags["convergence"] == ("still improving" if improving else "converged")
    assert ("convergence_warning" in run.data.tags) is improving
    assert run.data.metrics["still_improving"] == float(improving)
    assert ("train: WARNING: still improving" in demo.log) is improving
    page = (project.root / "reports" / "attention" / "index.html").read_text()
    assert ("Training warning:" in page) is improving
    if improving:
        assert "raise train.budget_pairs" in run.data.tags["convergence_warning"]


def test_cli_captions_match_evaluate(demo):
    project = demo.project
    table = pd.read_parquet(project.root / "data" / "interim" / "captions.parquet")
    paths = table.drop_duplicates("image_id").set_index("image_id")["path"]
    predictions = json.loads((project.root / "reports" / "predictions_test.json").read_text())
    chosen = sorted(predictions, key=lambda p: p["image_id"])[:2]
    images = [paths[p["image_id"]] for p in chosen]

    done = project.run(VENV_BIN / "captioning", "caption", *images)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(images), describe(done)
    for line, image, prediction in zip(lines, images, chosen, strict=True):
        shown_path, caption = line.split("\t")
        assert shown_path == image
        assert caption == prediction["caption"], (image, caption, prediction)


def test_dvc_plots_render_every_declared_plot(demo):
    project = demo.project
    done = project.dvc("plots", "show", "--json")
    shown = json.loads(done.stdout)["data"]
    titles = (
        "Training loss",
        "Convergence, val CIDEr (greedy, fixed val sample; smoothed = what early stopping reads)",
        "Convergence, val object accuracy (demo data)",
        "Scores by caption length (test split)",
    )
    assert set(titles) <= set(shown), sorted(shown)
    for title in titles:
        (plot,) = shown[title]
        assert plot["content"]["data"]["values"], f"{title}: no points"
    by_length = pd.read_csv(project.root / "reports" / "scores_by_length.csv")
    assert list(by_length.columns) == [
        "reference_words", "images", "BLEU-4", "CIDEr", "object_accuracy",
    ]  # fmt: skip
    per_image = pd.read_csv(project.root / "reports" / "per_image.csv")
    assert by_length["images"].sum() == len(per_image)
    history = pd.read_csv(project.root / "reports" / "train_history.csv")
    assert history["val_CIDEr"].notna().all() and len(history) == 2


def test_nothing_to_do_after_repro(demo):
    project = demo.project
    status = project.dvc("status", "--json")
    assert json.loads(status.stdout) == {}, status.stdout

    again = project.dvc("repro")
    log = again.stdout + again.stderr
    assert _stages_run(log) == [], log
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change" in log, log


def test_new_pixels_under_the_same_file_names_make_features_stale(demo):
    """The caption table names the images; the features must also follow what is in them."""
    project = demo.project
    image = sorted((project.root / "data" / "raw" / "demo" / "train2014").glob("*.jpg"))[0]
    original = image.read_bytes()
    try:
        with Image.open(image) as picture:
            pixels = np.asarray(picture)
        Image.fromarray(255 - pixels).save(image, format="JPEG")  # same name, new content
        stale = json.loads(project.dvc("status", "--json").stdout)
        assert {"validate", "features", "train"} <= set(stale), stale
    finally:
        image.write_bytes(original)
    assert json.loads(project.dvc("status", "--json").stdout) == {}


# --- a local folder in the COCO 2014 layout -----------------------------------------------------


def test_local_coco_folder(tmp_path):
    coco = tmp_path / "coco"
    written = write_coco_folder(coco, n_train=8, n_val=6)
    project = make_project(tmp_path / "pipeline", {"data.source": "local", "data.path": str(coco)})
    reproduced = _repro(project)
    assert _stages_run(reproduced.log) == STAGES, reproduced.log[-3000:]
    print(f"local dvc repro: {reproduced.seconds:.0f} s")

    root = project.root
    table = pd.read_parquet(root / "data" / "interim" / "captions.parquet")
    by_split = table.drop_duplicates("image_id").groupby("split")["image_id"].apply(set)
    assert by_split["train"] == set(written["train2014"])
    assert by_split["val"] | by_split["test"] == set(written["val2014"])
    assert all(Path(p).name.startswith("COCO_") for p in table["path"])

    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    _check_corpus_metrics(metrics, (*COCO_METRICS, *HUMAN_METRICS))
    assert "object_accuracy" not in metrics, "object accuracy is a demo-only score"
    predictions = json.loads((root / "reports" / "predictions_test.json").read_text())
    assert {p["image_id"] for p in predictions} == by_split["test"]


def test_local_coco_folder_with_problem_files(tmp_path):
    coco = tmp_path / "coco"
    written = write_coco_folder(coco, n_train=10, n_val=6)
    cases = add_problem_cases(coco)
    project = make_project(
        tmp_path / "pipeline",
        {
            "data.source": "local",
            "data.path": str(coco),
            # 2 of 21 images are quarantined, above the default 5%.
            "validate.max_quarantine_fraction": 0.3,
        },
    )
    reproduced = _repro(project)
    assert _stages_run(reproduced.log) == STAGES, reproduced.log[-3000:]
    print(f"problem-files dvc repro: {reproduced.seconds:.0f} s")
    root = project.root

    # The quarantine report lists exactly the truncated and the empty file, with reasons.
    quarantine = json.loads((root / "reports" / "quarantine.json").read_text())
    expected = sorted(
        (cases[case], coco_file_name(PROBLEM_CASES[case][0], cases[case]), reason)
        for case, reason in QUARANTINE_REASONS.items()
    )
    assert [(q["image_id"], q["file_name"], q["reason"]) for q in quarantine] == expected
    assert all(set(q) == {"image_id", "file_name", "reason", "detail"} for q in quarantine)
    details = {q["image_id"]: q["detail"] for q in quarantine}
    assert "truncated" in details[cases["truncated"]].lower(), details
    assert details[cases["zero_byte"]] == "empty input (0 bytes)", details  # the one reader's words

    # Grayscale, CMYK and PNG-as-.jpg are kept, with their decoded sizes; no blank caption.
    table = pd.read_parquet(root / "data" / "interim" / "captions.parquet")
    images = table.drop_duplicates("image_id").set_index("image_id")
    ordinary = set(written["train2014"]) | set(written["val2014"])
    kept = {cases[case] for case in KEPT_CASES}
    assert set(images.index) == ordinary | kept
    for image_id in kept:
        assert (images.loc[image_id, "width"], images.loc[image_id, "height"]) == (64, 48)
    assert table["caption"].str.strip().ne("").all()
    assert BLANK_CAPTION not in set(table["caption"])
    assert (table["image_id"] == cases["grayscale"]).sum() == 5  # its five real captions

    # The validation report counts the dropped annotation, the blank caption and the quarantine.
    report = json.loads((root / "reports" / "validation" / "result.json").read_text())
    assert report["success"] is True, report["hard_failures"]
    counts = report["counts"]
    missing_name = coco_file_name(PROBLEM_CASES["missing"][0], cases["missing"])
    assert counts["layout"]["missing_image_files"] == 1, counts["layout"]
    assert counts["layout"]["missing_image_examples"] == [missing_name]
    assert counts["layout"]["missing_image_captions"] == 5
    assert counts["captions"]["blank_captions"] == 1 and counts["captions"]["null_captions"] == 0
    assert counts["images_checked"] == len(ordinary) + len(kept) + len(QUARANTINE_REASONS)
    assert counts["images_quarantined"] == len(QUARANTINE_REASONS)
    assert counts["quarantine_reasons"] == {"empty_file": 1, "truncated": 1}
    assert counts["images_kept"] == len(ordinary) + len(kept)

    # Every kept image, the awkward ones included, has finite float16 features.
    features = root / "data" / "features"
    index = pd.read_parquet(features / "index.parquet").set_index("image_id")
    assert set(index.index) == set(images.index)
    store = FeatureStore(features)
    for image_id in kept:
        vector = store.get([image_id])[0]
        assert vector.dtype == np.float16 and np.isfinite(vector).all(), image_id

    # Predictions cover the kept test images, at least one of the awkward ones among them.
    test_ids = set(images.index[images["split"] == "test"])
    assert test_ids & kept, f"no awkward image in the test split: {sorted(test_ids)}"
    predictions = json.loads((root / "reports" / "predictions_test.json").read_text())
    ids = [p["image_id"] for p in predictions]
    assert len(ids) == len(set(ids)) and set(ids) == test_ids

    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    _check_corpus_metrics(metrics, (*COCO_METRICS, *HUMAN_METRICS))


# --- experiments (these change the demo project: keep them last) --------------------------------


def _experiments(shown: list[dict]) -> dict[str, dict]:
    """{experiment name: flattened params.yaml} from `dvc exp show --json` (DVC 3 layout)."""
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                data = rev.get("data") or {}
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                found[rev.get("name") or experiment.get("name") or rev["rev"]] = flatten(params)
    return found


def _experiment_metrics(shown: list[dict]) -> dict[str, dict]:
    """{experiment name: {metrics file: its values}} from `dvc exp show --json` (DVC 3 layout)."""
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                metrics = (rev.get("data") or {}).get("metrics") or {}
                name = rev.get("name") or experiment.get("name") or rev["rev"]
                found[name] = {path: entry.get("data", {}) for path, entry in metrics.items()}
    return found


def test_experiment_with_overrides(demo):
    project = demo.project
    project.commit_all("baseline: tiny demo reproduced")  # dvc.lock and DVC's .gitignore entries

    done = project.dvc(
        "exp", "run", "-S", "train.learning_rate=0.002", "-S", "train.budget_pairs=16"
    )
    log = done.stdout + done.stderr
    assert _stages_run(log) == ["check", "evaluate", "register", "report", "train"], log

    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    experiments = _experiments(shown)
    assert len(experiments) == 1, experiments
    ((name, params),) = experiments.items()
    assert params["train.learning_rate"] == 0.002 and params["train.budget_pairs"] == 16, params
    # DVCLive's latest epoch is a column of the experiments table.
    live = _experiment_metrics(shown)[name]["dvclive/metrics.json"]
    assert live["step"] == 16 and live["train"]["loss"] > 0, live

    runs = _runs(project)
    assert len(runs) == 2, [r.info.run_id for r in runs]
    latest = runs[-1]
    assert latest.data.params["train.learning_rate"] == "0.002"
    assert latest.data.tags.get("dvc_experiment") == name, latest.data.tags
    assert latest.info.run_name == f"{name} train.budget_pairs=16 train.learning_rate=0.002"
    history = _client(project).get_metric_history(latest.info.run_id, "loss")
    assert [m.step for m in history] == [16]  # one epoch of 16 pairs


def test_unknown_param_override_fails_loudly(demo):
    project = demo.project
    try:
        _check_unknown_param_override(project)
    finally:
        # `check` puts params.yaml back after a failed experiment; this undoes any other failure.
        project.git("checkout", "--", "params.yaml")


def _check_unknown_param_override(project: Project) -> None:
    # DVC refuses to add a key without hydra's `+`; the message names the key.
    refused = project.dvc("exp", "run", "-S", "train.lerning_rate=1", check=False)
    assert refused.returncode != 0, describe(refused)
    assert "lerning_rate" in refused.stdout + refused.stderr, describe(refused)
    assert _stages_run(refused.stdout + refused.stderr) == [], describe(refused)

    # With `+` DVC writes the key, and the `check` stage stops the run before any
    # other stage (and before an MLflow run opens).
    runs_before = len(_runs(project))
    added = project.dvc("exp", "run", "-S", "+train.lerning_rate=1", check=False)
    output = added.stdout + added.stderr
    assert added.returncode != 0, describe(added)
    assert "unknown key in params section 'train'" in output, describe(added)
    assert _stages_run(output) == ["check"], describe(added)
    assert "lerning_rate" in output, describe(added)
    assert len(_runs(project)) == runs_before
