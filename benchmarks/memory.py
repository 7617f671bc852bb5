"""Memory: peak RSS of extraction and of training at two data set sizes each.

Features are memory-mapped and batches streamed, so neither workload's memory
should grow with the data. Each workload runs in a fresh interpreter
(`python -m benchmarks.memory KIND CONFIG_JSON`) that reports its own
high-water mark and sampled peak anonymous RSS as one JSON line, so what the
parent holds does not count. (A child's ru_maxrss from wait4 is useless here:
exec keeps the high-water mark of the forked copy of the parent.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from benchmarks.harness import PeakSampler, Result, status_kib
from benchmarks.workspace import (
    CAPTIONS_PER_IMAGE,
    CHANNELS,
    LOCATIONS,
    REPO_ROOT,
    Sizes,
    Workspace,
    compile_for_training,
    extract,
    fake_tokens,
    image_table,
    new_extractor,
    tutorial_model,
    write_fake_store,
)
from captioning.features import FeatureStore
from captioning.training.batches import CaptionSet, caption_batches

CHILD_PREFIX = "BENCH_CHILD "
GROWTH_TARGET = 0.10  # peak anonymous RSS may grow this much for several times the data


def _extract_workload(config: dict, sizes: Sizes) -> None:
    images = image_table(Path(config["demo_root"]), config["images"])
    extractor = new_extractor(sizes.image_size)
    extract(images, Path(config["out"]), extractor, sizes, sizes.memory_shard_size)


def _train_workload(config: dict, sizes: Sizes) -> None:
    store, vocab = FeatureStore(config["store"]), config["vocab_size"]
    ids = np.repeat(store.image_ids("train"), CAPTIONS_PER_IMAGE)
    captions = CaptionSet(fake_tokens(len(ids), vocab, np.random.default_rng(0)), ids)
    model = tutorial_model(vocab, **sizes.model)
    model.encoder.set_feature_stats(*store.feature_stats("train"))  # as fit_captioner
    compile_for_training(model, sizes)
    steps = sizes.memory_train_steps
    batches = caption_batches(store, captions, sizes.train_batch, seed=0).take(steps)
    model.fit(batches.apply(tf.data.experimental.assert_cardinality(steps)), verbose=0)


WORKLOADS = {"features": _extract_workload, "train": _train_workload}


def child_main(kind: str, config: dict) -> None:
    """Run one workload in this (child) process and print its figures as JSON."""
    sizes = Sizes(**config.pop("sizes"))
    with PeakSampler(lambda: status_kib("RssAnon"), period=0.02) as anon:
        WORKLOADS[kind](config, sizes)
    report = {
        "vm_hwm_kib": status_kib("VmHWM"),
        "peak_anon_kib": max(anon.peak, status_kib("RssAnon")),
    }
    print(CHILD_PREFIX + json.dumps(report), flush=True)


def run_child(kind: str, config: dict) -> dict:
    """child_main in a fresh interpreter: the figures it reports about itself."""
    cmd = [sys.executable, "-m", "benchmarks.memory", kind, json.dumps(config)]
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{kind} memory child failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_PREFIX)]
    return json.loads(lines[-1][len(CHILD_PREFIX) :])


def _add_growth(result: Result, kind: str, runs: dict[int, dict]) -> None:
    """Peak RSS and peak anonymous RSS at both sizes, their growth, and the target."""
    (lo, small), (hi, large) = runs.items()
    times = f"{hi / lo:g}x data"
    for count, run in runs.items():
        result.add(f"{kind}: peak RSS (VmHWM), {count} images", run["vm_hwm_kib"] / 1024, "MiB")
        result.add(
            f"{kind}: peak anonymous RSS, {count} images", run["peak_anon_kib"] / 1024, "MiB"
        )
    result.add(
        f"{kind}: peak RSS growth for {times}", large["vm_hwm_kib"] / small["vm_hwm_kib"] - 1, ""
    )
    growth = large["peak_anon_kib"] / small["peak_anon_kib"] - 1
    result.add(f"{kind}: peak anonymous RSS growth for {times}", growth, "")
    # What an in-memory design would add: the extra images' float16 features.
    result.add(
        f"{kind}: extra features if held in RAM",
        (hi - lo) * LOCATIONS * CHANNELS * 2 / 2**20,
        "MiB",
    )
    result.check(f"{kind}: peak anonymous RSS growth for {times}", f"<= {GROWTH_TARGET:.2f}",
                 growth <= GROWTH_TARGET)  # fmt: skip


def bench_memory(ws: Workspace) -> Result:
    s = ws.sizes
    result = Result(
        f"memory: peak RSS in a child process (features {s.memory_images} images, shard_size "
        f"{s.memory_shard_size}; training {s.memory_train_images} images, "
        f"{s.memory_train_steps} steps of {s.train_batch}, vocab {ws.vocab_size})"
    )
    ws.images(max(s.memory_images))  # the children read the demo images: write them first
    common = {"sizes": dataclasses.asdict(s), "vocab_size": ws.vocab_size}
    features = {
        n: run_child("features", {**common, "demo_root": str(ws.demo_root), "images": n,
                                  "out": str(ws.root / f"mem-features-{n}")})
        for n in s.memory_images
    }  # fmt: skip
    train = {}
    for n in s.memory_train_images:
        write_fake_store(ws.root / f"mem-store-{n}", n)
        train[n] = run_child("train", {**common, "store": str(ws.root / f"mem-store-{n}")})
    _add_growth(result, "features", features)
    _add_growth(result, "train", train)
    result.notes.append(
        "peak RSS = VmHWM: exact, but it counts file-backed pages too (shared libraries, "
        "every memory-mapped feature page touched), which the kernel can drop; the target is "
        "on anonymous RSS (heap and tensors, sampled every 20 ms), which cannot be given back"
    )
    result.notes.append(
        "repeated runs peak up to ~20% apart (malloc arenas, TensorFlow's transient buffers), "
        "so one FAIL near the target may be noise; --quick's 2x sizes are a smoke test"
    )
    return result


if __name__ == "__main__":
    child_main(sys.argv[1], json.loads(sys.argv[2]))
