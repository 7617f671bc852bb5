"""Smoke tests of the benchmark suite: benchmarks run and write the report shape.

No timing assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from benchmarks.flops import captioner_flops, layer_flops
from benchmarks.train import loop_logits

from captioning.config import load_section
from captioning.data.demo import generate_demo
from captioning.data.sources import source_scorer, write_dataset_ref
from captioning.data.text import Vocabulary, clean_caption
from captioning.evaluation.evaluate import evaluate_split
from captioning.features import FeatureStore, build_extractor, extract_features
from captioning.model.captioner import load_captioner
from test_model import batch

REPO_ROOT = Path(__file__).resolve().parents[1]
QUALITY = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
DEMO_QUALITY = ["object_accuracy", "grounding"]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=REPO_ROOT,  # `benchmarks` is a folder of the repository, not an installed package
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_quick_store_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench("--quick", "--only", "store", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "store" in done.stdout and ("PASS" in done.stdout or "FAIL" in done.stdout)

    report = json.loads(out.read_text())
    assert {"quick", "vocab_size", "sizes", "machine", "benchmarks"} <= set(report)
    assert report["quick"] is True
    assert list(report["benchmarks"]) == ["store"]
    store = report["benchmarks"]["store"]
    assert {"title", "figures", "units", "checks", "notes", "wall_s", "load_average"} <= set(store)
    assert store["figures"]["bytes per image (all files)"] > 0
    (check,) = store["checks"]
    assert check["figure"] == "bytes per image (all files)"
    assert isinstance(check["pass"], bool) and check["target"]


def tiny_pipeline_outputs(root: Path, tiny_captioner, images: int = 6) -> None:
    """What `make repro` leaves for the decoders benchmark, at toy size, from real components.

    Demo images and object truth, a test-split caption table, an InceptionV3
    (random weights) feature store, and an untrained small captioner.
    """
    raw = root / "data" / "raw"
    generate_demo(raw / "demo", 0, images, seed=3)
    write_dataset_ref(raw, "demo", raw / "demo")
    coco = json.loads((raw / "demo" / "annotations" / "captions_val2014.json").read_text())
    paths = {i["id"]: str(raw / "demo" / "val2014" / i["file_name"]) for i in coco["images"]}
    table = pd.DataFrame(coco["annotations"])[["image_id", "caption"]]
    table = table.assign(split="test", path=table["image_id"].map(paths))
    (root / "data" / "interim").mkdir(parents=True)
    table.to_parquet(root / "data" / "interim" / "captions.parquet", index=False)
    extract_features(
        table.drop_duplicates("image_id")[["image_id", "path", "split"]],
        root / "data" / "features",
        build_extractor("none", 299, seed=0),
        batch_size=4,
        progress=False,
    )
    vocab = Vocabulary.build([clean_caption(c) for c in table["caption"]], 100)
    model = tiny_captioner(
        vocab, (64, 2048), embedding_dim=8, units=16, attention_units=8, encoder_dim=8
    )
    (root / "models").mkdir()
    model.save(root / "models" / "captioner.keras")
    # Two batches of 4 for 6 images: the last batch is a partial one.
    (root / "params.yaml").write_text("evaluate:\n  split: test\n  max_len: 8\n  batch_size: 4\n")


@pytest.mark.slow
def test_decoders_benchmark_scores_and_times_each_decoder(tmp_path, monkeypatch, tiny_captioner):
    monkeypatch.chdir(REPO_ROOT)  # dataset.json stores the demo folder relative to the cwd
    project, out = tmp_path / "project", tmp_path / "bench.json"
    tiny_pipeline_outputs(project, tiny_captioner)
    done = run_bench("--quick", "--only", "decoders", "--project", str(project), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "captions/s" in done.stdout and "beam 5" in done.stdout

    entry = json.loads(out.read_text())["benchmarks"]["decoders"]
    assert entry["figures"]["images"] == 6
    assert [row["decoder"] for row in entry["rows"]] == ["greedy", "beam 3", "beam 5"]
    for row in entry["rows"]:
        assert set(QUALITY + DEMO_QUALITY) <= set(row)
        assert all(0.0 <= row[m] <= 1.0 for m in QUALITY + DEMO_QUALITY if m != "CIDEr")
        assert row["CIDEr"] >= 0.0
        assert 0 <= row["mean words"] <= 8
        assert row["captions/s"] > 0
    assert not entry["checks"]  # scores are reported, not judged

    # The greedy row is what the evaluate stage's own function scores.
    direct = evaluate_split(
        load_captioner(str(project / "models" / "captioner.keras")),
        FeatureStore(project / "data" / "features"),
        pd.read_parquet(project / "data" / "interim" / "captions.parquet"),
        load_section("evaluate", project / "params.yaml"),
        source_scorer(project / "data" / "raw"),
    ).corpus
    greedy = entry["rows"][0]
    assert {m: greedy[m] for m in QUALITY + DEMO_QUALITY} == pytest.approx(
        {m: direct[m] for m in QUALITY + DEMO_QUALITY}
    )


@pytest.mark.slow
def test_decoders_benchmark_says_what_is_missing(tmp_path):
    done = run_bench(
        "--only", "decoders", "--project", str(tmp_path), "--out", str(tmp_path / "b.json")
    )
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
