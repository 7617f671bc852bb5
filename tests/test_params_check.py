"""The whole-params check: every bad value fails in one line, before any stage does work.

Unit tests check `captioning.config.check_params` (types, ranges, enums, unknown
keys and sections) and the `check` stage's exit status and output; the slow
tests run real `dvc exp run -S ...` and `dvc repro` in a throwaway project
reproduced up to `tokenize`: a bad value stops at `check`, no earlier output
is deleted or changed, no MLflow run starts, and a failed experiment leaves
params.yaml as it found it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from captioning.config import ConfigError, check_params, load_section, read_params
from captioning.params_restore import restore
from pipeline_fixtures import REPO_ROOT, describe, make_project

PARAMS = read_params(REPO_ROOT / "params.yaml")

# (section, key, value, the one line check_params must give)
BAD_VALUES = [
    ("train", "decoder", "lstm", "train.decoder = 'lstm': allowed: one of ['gru', 'transformer']"),
    ("train", "learning_rate", "fast", "train.learning_rate = 'fast': allowed: float, got str"),
    ("train", "learning_rate", math.nan, "train.learning_rate = nan: allowed: a number > 0"),
    ("train", "budget_pairs", -5, "train.budget_pairs = -5: allowed: a number > 0"),
    ("train", "label_smoothing", 1.0, "train.label_smoothing = 1.0: allowed: a number in [0, 1)"),
    ("train", "jit_compile", 1, "train.jit_compile = 1: allowed: bool, got int"),
    ("train", "lerning_rate", 1,
     "train.lerning_rate = 1: unknown key in params section 'train'; did you mean train.learning_rate?"),
    ("features", "batch_size", 0, "features.batch_size = 0: allowed: a number >= 1"),
    ("features", "image_size", 32, "features.image_size = 32: allowed: a number >= 75"),
    ("split", "val_fraction", 1.0, "split.val_fraction = 1.0: allowed: a number in (0, 1)"),
    ("validate", "max_quarantine_fraction", 1.5,
     "validate.max_quarantine_fraction = 1.5: allowed: a number in [0, 1]"),
    ("tokenize", "vocab_size", 0, "tokenize.vocab_size = 0: allowed: a number >= 1"),
    ("evaluate", "temperature", 0, "evaluate.temperature = 0: allowed: a number > 0"),
    ("evaluate", "decoder", "topk",
     "evaluate.decoder = 'topk': allowed: one of ['greedy', 'sample', 'beam']"),
    ("register", "max_batch", 0, "register.max_batch = 0: allowed: a number >= 1"),
    ("data", "source", "coco", "data.source = 'coco': allowed: one of "
     "['demo', 'scenes', 'local', 'coco2014', 'flickr8k', 'flickr30k']"),
]  # fmt: skip


def _with(section: str, key: str, value) -> dict:
    params = copy.deepcopy(PARAMS)
    params[section][key] = value
    return params


def test_the_projects_params_pass():
    assert check_params(PARAMS) == []


@pytest.mark.parametrize(("section", "key", "value", "line"), BAD_VALUES)
def test_each_bad_value_is_one_line_naming_key_value_and_what_is_allowed(
    section, key, value, line, tmp_path
):
    assert check_params(_with(section, key, value)) == [line]
    # A stage reading only its own section fails the same way.
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_with(section, key, value)))
    with pytest.raises(ConfigError) as err:
        load_section(section, path)
    assert str(err.value) == line


def test_every_problem_of_the_file_is_listed_sections_included():
    params = _with("train", "budget_pairs", 0)
    params["features"]["shard_size"] = 0
    params["trian"] = {"units": 1}
    del params["report"]
    assert check_params(params) == [
        "features.shard_size = 0: allowed: a number >= 1",
        "train.budget_pairs = 0: allowed: a number > 0",
        "trian: unknown params section; did you mean 'train'?",
        "report: missing params section",
    ]
    assert check_params({"train": PARAMS["train"]}, require_all=False) == []


def test_rules_between_keys_and_gate_values():
    words = _with("validate", "min_caption_words", 70)
    assert check_params(words) == [
        "validate.max_caption_words = 60: allowed: a number >= validate.min_caption_words (70)"
    ]
    odd = _with("train", "transformer_width", 250)
    assert check_params(odd) == []  # the GRU decoder does not use it
    odd["train"]["decoder"] = "transformer"
    assert check_params(odd) == [
        "train.transformer_width = 250: allowed: a multiple of train.transformer_heads (4)"
    ]
    gates = copy.deepcopy(PARAMS)
    gates["gates"]["tolerances"]["CIDEr"] = -0.1
    assert check_params(gates) == ["gates.tolerances.CIDEr = -0.1: allowed: a number >= 0"]


def _check_stage(tmp_path: Path, params: dict, **env) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    clean.pop("CAPTIONING_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "stages.check", "--params", str(tmp_path / "params.yaml"),
         "--lock", str(tmp_path / "dvc.lock"), "--out", str(tmp_path / "check.json")],
        cwd=REPO_ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_check_stage_fails_in_one_line_with_exit_2_and_the_traceback_behind_debug(tmp_path):
    bad = _with("train", "budget_pairs", -5)
    done = _check_stage(tmp_path, bad)
    assert done.returncode == 2, describe(done)
    assert done.stderr.splitlines() == ["error: train.budget_pairs = -5: allowed: a number > 0"]
    assert not (tmp_path / "check.json").exists()
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == bad  # outside dvc exp run

    debug = _check_stage(tmp_path, bad, CAPTIONING_DEBUG="1")
    assert debug.returncode == 1, describe(debug)
    assert "Traceback" in debug.stderr and "ConfigError: train.budget_pairs = -5" in debug.stderr


def test_a_passing_check_writes_the_same_marker_for_every_valid_params(tmp_path):
    done = _check_stage(tmp_path, PARAMS)
    assert done.returncode == 0, describe(done)
    marker = tmp_path / "check.json"
    first, mtime = marker.read_bytes(), marker.stat().st_mtime_ns
    time.sleep(0.01)
    again = _check_stage(tmp_path, _with("train", "units", 64))
    assert again.returncode == 0, describe(again)
    # Unchanged bytes and mtime: the stages after `check` never look changed because of it.
    assert (marker.read_bytes(), marker.stat().st_mtime_ns) == (first, mtime)
    assert json.loads(first)["checked_sections"] == sorted(PARAMS)


def test_restore_sets_back_only_what_differs_and_keeps_the_comments(tmp_path):
    original = (REPO_ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    changed = original.replace("  budget_pairs: 60000", "  budget_pairs: -5", 1)
    changed = changed.replace("  decoder: gru", "  decoder: lstm", 1)
    path.write_text(changed + "trian:\n  x: 1\n")
    assert restore(path, PARAMS) == ["trian", "train.decoder", "train.budget_pairs"]
    assert read_params(path) == PARAMS
    comments = [line.split("#", 1)[1] for line in original.splitlines() if "#" in line]
    text = path.read_text()
    assert all(comment in text for comment in comments)
    assert "path: null" in text  # nulls stay written as null
    assert restore(path, PARAMS) == []


# --- real dvc: a project reproduced up to tokenize ---------------------------------------------

EARLIER_OUTPUTS = ("data/raw", "data/interim/captions.parquet", "data/tokens")


def _fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under the earlier stages' outputs, and the check's marker."""
    found = {}
    for name in (*EARLIER_OUTPUTS, "reports/params_check.json"):
        path = root / name
        assert path.exists(), f"{name} missing"
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            found[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """(project, its committed params.yaml bytes, output fingerprint) after `dvc repro tokenize`."""
    project = make_project(tmp_path_factory.mktemp("params-check"))
    # The stages import the copy of src/ that dvc.yaml tracks (this checkout's code).
    project.env["PYTHONPATH"] = str(project.root / "src")
    project.dvc("repro", "tokenize")
    project.commit_all("reproduced up to tokenize")
    return project, (project.root / "params.yaml").read_bytes(), _fingerprint(project.root)


def _stages_run(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]


def _mlflow_runs(project) -> int:
    db = Path(project.tracking_uri.removeprefix("sqlite:///"))
    if not db.exists():
        return 0
    import mlflow

    client = mlflow.MlflowClient(project.tracking_uri)
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["train.decoder=lstm", "train.units=64"],
         "error: train.decoder = 'lstm': allowed: one of ['gru', 'transformer']"),
        (["train.budget_pairs=-5"], "error: train.budget_pairs = -5: allowed: a number > 0"),
        (["+train.lerning_rate=0.01"], "error: train.lerning_rate = 0.01: unknown key in params "
         "section 'train'; did you mean train.learning_rate?"),
        (["features.batch_size=0"], "error: features.batch_size = 0: allowed: a number >= 1"),
        # tokenize's own output would be deleted first if the stage checked its params itself.
        (["tokenize.vocab_size=0"], "error: tokenize.vocab_size = 0: allowed: a number >= 1"),
    ],
)  # fmt: skip
def test_a_bad_experiment_stops_at_check_and_changes_nothing(checked, overrides, line):
    project, committed, outputs = checked
    runs = _mlflow_runs(project)
    start = time.monotonic()
    done = project.dvc("exp", "run", *[a for o in overrides for a in ("-S", o)], check=False)
    seconds = time.monotonic() - start
    log = done.stdout + done.stderr
    assert done.returncode != 0, describe(done)
    assert _stages_run(log) == ["check"], log
    assert [ln for ln in log.splitlines() if ln.startswith("error:")] == [line], log
    assert "Traceback" not in log
    assert (project.root / "params.yaml").read_bytes() == committed, log
    assert project.git("status", "--porcelain").stdout == ""
    assert _fingerprint(project.root) == outputs
    assert _mlflow_runs(project) == runs
    print(f"{overrides}: failed in {seconds:.1f} s")


@pytest.mark.slow
def test_a_hand_edited_bad_value_stops_dvc_repro_and_stays_for_the_person_to_fix(checked):
    project, committed, outputs = checked
    path = project.root / "params.yaml"
    try:
        path.write_bytes(committed.replace(b"vocab_size: 5000", b"vocab_size: -1"))
        edited = path.read_bytes()
        assert edited != committed
        done = project.dvc("repro", check=False)
        log = done.stdout + done.stderr
        assert done.returncode != 0 and _stages_run(log) == ["check"], log
        assert "error: tokenize.vocab_size = -1: allowed: a number >= 1" in log.splitlines()
        assert path.read_bytes() == edited  # `dvc repro` is not an experiment: nothing is undone
        assert _fingerprint(project.root) == outputs
    finally:
        path.write_bytes(committed)
    stale = json.loads(project.dvc("status", "--json").stdout)
    assert not {"check", "download", "validate", "tokenize"} & set(stale), stale
