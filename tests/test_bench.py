"""The benchmark runner: every registered benchmark runs in --quick mode and reports real numbers.

No timing assertions: the figures depend on the machine and its load. Each
benchmark runs through `python -m benchmarks --quick`, as a user runs it; its
report must hold finite numbers for every figure and table cell, and the
markdown table it prints must show them. The FLOP counts and the training
benchmark's baselines are checked against hand counts and the model's scan.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from benchmarks.flops import captioner_flops, layer_flops
from benchmarks.harness import report_rows
from benchmarks.registry import BY_NAME
from benchmarks.train import loop_logits

from captioning.config import load_section
from captioning.data.sources import source_scorer
from captioning.evaluation.evaluate import evaluate_split
from captioning.features import FeatureStore
from captioning.model.captioner import load_captioner
from test_model import batch

REPO_ROOT = Path(__file__).resolve().parents[1]
QUALITY = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
IN_PROCESS = ["features", "store", "train", "memory", "decode", "precision"]
WITH_PROCESSES = ["serve", "distributed", "multi_worker_fit"]
ON_A_PIPELINE = ["convergence", "decoders", "architectures"]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=REPO_ROOT,  # `benchmarks` is a folder of the repository, not an installed package
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def real(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def quick_report(tmp_path: Path, names: list[str], *options: str) -> dict:
    """Run `names` with --quick; check every figure is a finite number, printed in the table."""
    out = tmp_path / "bench.json"
    done = run_bench("--quick", *names, *options, "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["machine"]["cpus"] >= 1
    assert list(report["benchmarks"]) == names
    for name, entry in report["benchmarks"].items():
        assert entry["figures"] or entry.get("rows"), name
        assert all(real(v) for v in entry["figures"].values()), (name, entry["figures"])
        for row in entry.get("rows", []):
            label, *cells = row.values()
            assert isinstance(label, str) and all(real(v) for v in cells), (name, row)
        assert all(c["figure"] in entry["figures"] and isinstance(c["pass"], bool)
                   for c in entry["checks"])  # fmt: skip
        assert entry["wall_s"] >= 0 and entry["notes"][-1].startswith("took ")
    printed = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert printed[0].startswith("| benchmark | figure | value |")
    table = [line.split(" | ")[2] for line in printed[1:]]
    assert table == [value for _, _, value, _, _ in report_rows(report)]
    assert all(real(float(v.replace(",", ""))) for v in table if v not in ("True", "False"))
    return report


def test_every_benchmark_is_registered_callable_and_tested_here():
    assert set(BY_NAME) == set(IN_PROCESS + WITH_PROCESSES + ON_A_PIPELINE)
    assert all(callable(bench.function()) for bench in BY_NAME.values())


@pytest.mark.slow
def test_quick_in_process_benchmarks_report_real_figures(tmp_path):
    report = quick_report(tmp_path, IN_PROCESS)
    store = report["benchmarks"]["store"]["figures"]
    assert 0 < store["bytes per image (all files)"] < 524_288  # under float32's size
    precisions = [row["precision"] for row in report["benchmarks"]["precision"]["rows"]]
    assert precisions == ["float32", "mixed_float16", "mixed_bfloat16"]


@pytest.mark.slow
def test_quick_serve_and_distributed_benchmarks_report_real_figures(tmp_path):
    report = quick_report(tmp_path, WITH_PROCESSES, "--untrained", "--concurrency", "2")
    serve = report["benchmarks"]["serve"]
    assert serve["figures"]["failed requests"] == 0 and serve["rows"][0]["requests"] == 12
    steps = report["benchmarks"]["distributed"]["figures"]
    assert steps["two workers, global batch"] > 0 and steps["one process, half batch"] > 0
    fit = report["benchmarks"]["multi_worker_fit"]
    assert len(fit["figures"]) == 2 and all("worker" in note for note in fit["notes"][:2])


@pytest.mark.slow
def test_quick_convergence_then_decoders_and_architectures_on_its_project(tmp_path):
    scratch, results = tmp_path / "convergence", tmp_path / "convergence.json"
    options = ("--scratch", str(scratch), "--results", str(results))
    (run,) = quick_report(tmp_path, ["convergence"], *options)["benchmarks"]["convergence"]["rows"]
    assert run["epochs_run"] >= 1 and len(json.loads(results.read_text())) == 1

    project = scratch / "demo24"  # a real pipeline: dvc repro up to evaluate
    report = quick_report(tmp_path, ON_A_PIPELINE[1:], "--project", str(project))
    decoders = report["benchmarks"]["decoders"]
    assert [row["decoder"] for row in decoders["rows"]] == ["greedy", "beam 3", "beam 5"]
    for row in decoders["rows"]:
        assert all(0.0 <= row[m] <= 1.0 for m in QUALITY if m != "CIDEr") and row["CIDEr"] >= 0
    rows = report["benchmarks"]["architectures"]["rows"]
    assert [row["decoder"] for row in rows] == ["gru", "transformer"]
    assert all(row["train pairs/s"] > 0 and row["one image ms"] > 0 for row in rows)

    # The greedy row is what the evaluate stage's own function scores.
    os.chdir(project)  # the pipeline's files name each other from its root
    try:
        direct = evaluate_split(
            load_captioner(str(project / "models" / "captioner.keras")),
            FeatureStore(project / "data" / "features"),
            pd.read_parquet(project / "data" / "interim" / "captions.parquet"),
            load_section("evaluate", project / "params.yaml"),
            source_scorer(project / "data" / "raw"),
        ).corpus
    finally:
        os.chdir(REPO_ROOT)
    greedy = decoders["rows"][0]
    assert {m: greedy[m] for m in QUALITY} == pytest.approx({m: direct[m] for m in QUALITY})


@pytest.mark.slow
def test_runner_refuses_unknown_names_and_says_what_decoders_miss(tmp_path):
    done = run_bench("nonsense", "--out", str(tmp_path / "a.json"))
    assert done.returncode != 0 and "unknown benchmark" in done.stderr
    done = run_bench("decoders", "--project", str(tmp_path), "--out", str(tmp_path / "b.json"))
    assert done.returncode != 0
    assert "make repro" in done.stderr and "captioner.keras" in done.stderr
    assert not (tmp_path / "b.json").exists()


def test_benchmark_step_loops_compute_the_scans_logits(tiny_captioner):
    """The training benchmark's baselines (the tutorial's per-word decoder call, and
    the same loop with the keys hoisted) compute what the compiled scan computes."""
    model = tiny_captioner()
    features, tokens = batch()
    scan_logits, _ = model((features, tokens[:, :-1]))
    for hoisted in (False, True):
        loop = loop_logits(model, features, tokens, hoisted)
        np.testing.assert_allclose(loop.numpy(), scan_logits.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- FLOP counting


def test_layer_flops_counts_conv_and_dense_from_their_shapes():
    """A small model counted by hand: a multiply-add is 2 FLOPs, normalisation is left out."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8x8 positions x 3*3*3 x 4
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(2, 1, strides=2)(x)  # 4x4 positions x 1*1*4 x 2
    x = keras.layers.Dense(3)(x)  # applied at each of the 4x4 positions: 2 x 3
    outputs = keras.layers.Dense(5)(keras.layers.Flatten()(x))  # 48 x 5
    model = keras.Model(inputs, outputs)
    by_hand = 2 * (64 * 27 * 4 + 16 * 4 * 2 + 16 * 2 * 3 + 48 * 5)
    assert layer_flops(model) == by_hand
    nested = keras.Model(inputs, keras.layers.Dense(1)(model(inputs)))  # a model inside a model
    assert layer_flops(nested) == by_hand + 2 * 5


def test_captioner_flops_by_hand(tiny_captioner):
    model = tiny_captioner(
        feature_shape=(9, 32), embedding_dim=8, units=16, attention_units=8, encoder_dim=8
    )
    vocab = model.decoder.fc2.kernel.shape[1]
    flops = captioner_flops(model)
    # L=9, C=32, E=8, A=8, U=16, D=8: encoder L*C*E, keys L*E*A, initial state E*U
    assert flops.per_image == 2 * (9 * 32 * 8 + 9 * 8 * 8 + 8 * 16)
    # GRU input (E+D)*3U, [W2 | recurrent] U*(A+3U), scores L*A, context L*E, fc1 U*U, fc2 U*V
    assert flops.per_word == 2 * (16 * 48 + 16 * (8 + 48) + 9 * 8 + 9 * 8 + 16 * 16 + 16 * vocab)
    assert flops.forward(5) == flops.per_image + 5 * flops.per_word
    assert flops.forward(5, captions_per_image=2) == flops.per_image / 2 + 5 * flops.per_word
