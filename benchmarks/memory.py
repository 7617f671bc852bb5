"""Memory benchmark: peak RSS of extraction and of training at two data set sizes.

Features are memory-mapped and batches streamed, so neither workload's memory
should grow with the data. Each workload runs in a fresh interpreter
(`python -m benchmarks.memory KIND CONFIG_JSON`, started by `run_child`) that
reports its own high-water mark and its sampled peak anonymous RSS as one
JSON line, so what the parent process holds does not count.
"""

from __future__ import annotations

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
    TRAIN_BATCH,
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


# ----------------------------------------------------------------------------- the child


def _extract_workload(config: dict) -> None:
    images = image_table(Path(config["demo_root"]), config["images"])
    extract(images, config["out"], new_extractor(), shard_size=config["shard_size"])


def _train_workload(config: dict) -> None:
    store = FeatureStore(config["store"])
    ids = np.repeat(store.image_ids("train"), CAPTIONS_PER_IMAGE)
    rng = np.random.default_rng(0)
    captions = CaptionSet(fake_tokens(len(ids), config["vocab_size"], rng), ids)
    model = tutorial_model(config["vocab_size"])
    model.encoder.set_feature_stats(*store.feature_stats("train"))  # as fit_captioner
    compile_for_training(model)
    batches = caption_batches(store, captions, TRAIN_BATCH, seed=0).take(config["steps"])
    batches = batches.apply(tf.data.experimental.assert_cardinality(config["steps"]))
    model.fit(batches, shuffle=False, verbose=0)


WORKLOADS = {"features": _extract_workload, "train": _train_workload}


def child_main(kind: str, config: dict) -> None:
    """Run one memory workload in this (child) process and print its figures as JSON."""
    if kind not in WORKLOADS:
        raise ValueError(f"unknown child workload {kind!r}")
    with PeakSampler(lambda: status_kib("RssAnon"), period=0.02) as anon:
        WORKLOADS[kind](config)
    anon_kib = max(anon.peak, status_kib("RssAnon"))
    report = {"vm_hwm_kib": status_kib("VmHWM"), "peak_anon_kib": anon_kib}
    print(CHILD_PREFIX + json.dumps(report), flush=True)


# ----------------------------------------------------------------------------- the parent


def run_child(kind: str, config: dict) -> dict:
    """Run child_main in a fresh interpreter and return the figures it reports about itself.

    The child reads its own VmHWM: the kernel's ru_maxrss of a child (os.wait4,
    RUSAGE_CHILDREN) is useless here, because exec keeps the high-water mark of
    the forked copy of this parent, which already holds InceptionV3 and more.
    """
    cmd = [sys.executable, "-m", "benchmarks.memory", kind, json.dumps(config)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{kind} memory child failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_PREFIX)]
    return json.loads(lines[-1][len(CHILD_PREFIX) :])


def _measure(ws: Workspace) -> dict[tuple[str, int], dict]:
    """Both workloads at both sizes: (kind, images) -> the child's figures."""
    sizes = ws.sizes
    ws.images(max(sizes.memory_images))  # the children read the demo images: write them first
    runs = {}
    for count in sizes.memory_images:
        config = {
            "demo_root": str(ws.demo_root),
            "images": count,
            "out": str(ws.root / f"mem-features-{count}"),
            "shard_size": sizes.memory_shard_size,
        }
        runs[("features", count)] = run_child("features", config)
    for count in sizes.memory_train_images:
        store = ws.root / f"mem-store-{count}"
        write_fake_store(store, count)
        config = {
            "store": str(store),
            "steps": sizes.memory_train_steps,
            "vocab_size": ws.vocab_size,
        }
        runs[("train", count)] = run_child("train", config)
    return runs


def _add_growth(result: Result, kind: str, lo: int, hi: int, runs: dict) -> None:
    """Peak RSS and peak anonymous RSS of `kind` at `lo` and `hi` images, and their growth."""
    peak_lo, peak_hi = (runs[(kind, n)]["vm_hwm_kib"] / 1024 for n in (lo, hi))
    anon_lo, anon_hi = (runs[(kind, n)]["peak_anon_kib"] / 1024 for n in (lo, hi))
    growth = anon_hi / anon_lo - 1
    times = f"{hi / lo:g}x data"
    for count, peak, anon in ((lo, peak_lo, anon_lo), (hi, peak_hi, anon_hi)):
        result.add(f"{kind}: peak RSS (VmHWM), {count} images", peak, "MiB")
        result.add(f"{kind}: peak anonymous RSS, {count} images", anon, "MiB")
    result.add(f"{kind}: peak RSS growth for {times}", peak_hi / peak_lo - 1, "")
    result.add(f"{kind}: peak anonymous RSS growth for {times}", growth, "")
    # What an in-memory design would add: the extra images' float16 features.
    extra = (hi - lo) * LOCATIONS * CHANNELS * 2 / 2**20
    result.add(f"{kind}: extra features if held in RAM", extra, "MiB")
    result.check(
        f"{kind}: peak anonymous RSS growth for {times}",
        f"<= {GROWTH_TARGET:.2f}",
        growth <= GROWTH_TARGET,
    )


def bench_memory(ws: Workspace) -> Result:
    sizes = ws.sizes
    small, large = sizes.memory_images
    train_small, train_large = sizes.memory_train_images
    result = Result(
        f"memory: peak RSS in a child process (features {small} vs {large} images, "
        f"shard_size {sizes.memory_shard_size}; training {train_small} vs {train_large} images, "
        f"{sizes.memory_train_steps} steps of {TRAIN_BATCH}, vocab {ws.vocab_size})"
    )
    runs = _measure(ws)
    _add_growth(result, "features", small, large, runs)
    _add_growth(result, "train", train_small, train_large, runs)
    result.notes.append(
        "peak RSS = VmHWM of each child process: exact, but it also counts file-backed pages "
        "(shared libraries, and every memory-mapped feature page the process has touched, "
        "e.g. feature_stats reads the whole train split), which the kernel can drop at will; "
        "the target is on anonymous RSS (heap and tensors, sampled every 20 ms), the memory "
        "that cannot be given back"
    )
    result.notes.append(
        "repeated runs of one workload peak up to ~20% apart (glibc malloc arenas, "
        "TensorFlow's transient buffers), so a single FAIL near the target may be noise; "
        "--quick's 2x features sizes are a smoke test, the default's 4x the measurement"
    )
    return result


if __name__ == "__main__":
    child_main(sys.argv[1], json.loads(sys.argv[2]))
