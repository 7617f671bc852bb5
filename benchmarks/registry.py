"""Every benchmark the runner knows: its name, its function, what it measures, its options.

A benchmark is one function `bench_NAME(ws: Workspace) -> Result` in a module
of this folder, and one `Benchmark` entry below: its name, that module
(imported only when it runs, so `--help` and the other benchmarks do not load
its libraries), a summary, whether a bare `python -m benchmarks` runs it (not
those that need a trained model, a server, worker processes or a DVC sweep),
and its command-line flags, read back from `ws.options`. The runner runs the
named ones in this order.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

import yaml

from benchmarks.workspace import REPO_ROOT


def option(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One argparse flag: `option("--steps", type=int, default=12, help=...)`."""
    return flags, kwargs


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    module: str  # in this folder; it defines bench_NAME
    summary: str
    default: bool = False
    options: tuple[tuple[tuple[str, ...], dict], ...] = ()

    def function(self) -> Callable:
        return getattr(importlib.import_module(f"benchmarks.{self.module}"), f"bench_{self.name}")


def train_override(text: str) -> tuple[str, object]:
    """`train.key=value` -> (key, YAML-parsed value), as `dvc exp run -S` reads it."""
    dotted, _, value = text.partition("=")
    section, _, key = dotted.partition(".")
    if section != "train" or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected train.KEY=VALUE")
    return key, yaml.safe_load(value)


PROJECT = option(
    "--project", type=Path, default=REPO_ROOT,
    help="decoders, architectures: the pipeline folder read (default: this repository)",
)  # fmt: skip
TRAIN_OVERRIDE = option(
    "-S", "--set", dest="overrides", action="append", default=[], type=train_override,
    metavar="train.KEY=VALUE",
    help="architectures, convergence: another train param for every run (YAML value)",
)  # fmt: skip

REGISTRY = (
    Benchmark("features", "features", "extract_features end to end vs bare InceptionV3", True),
    Benchmark("store", "features", "feature store bytes on disk per image", True),
    Benchmark("train", "train", "training pairs/s: compiled step vs the tutorial's loop", True),
    Benchmark("memory", "memory", "peak RSS of extraction and training at two data sizes", True),
    Benchmark("decode", "decode", "batched greedy captions/s vs one image at a time", True),
    Benchmark("precision", "train", "training pairs/s by train.precision, share of peaks"),
    Benchmark(
        "decoders",
        "decoders",
        "greedy vs beam 3 vs beam 5 on a trained pipeline (make repro)",
        options=(PROJECT, option("--model", type=Path, help="decoders: the .keras to score")),
    ),  # fmt: skip
    Benchmark(
        "architectures",
        "decoders",
        "GRU vs transformer, trained on a tokenized pipeline",
        options=(
            PROJECT,
            TRAIN_OVERRIDE,
            option("--decoders", nargs="+", default=["gru", "transformer"]),
        ),
    ),  # fmt: skip
    Benchmark(
        "serve",
        "serve",
        "latency, throughput and memory of mlflow models serve",
        options=(
            option("--url", help="serve: an already running server on 127.0.0.1"),
            option("--server-pid", type=int, help="serve: with --url, its pid (for its memory)"),
            option("--model-uri", default="models:/image-captioner@champion", help="serve"),
            option("--untrained", action="store_true", help="serve: an untrained default model"),
            option("--requests", type=int, default=300, help="serve: requests per scenario"),
            option("--concurrency", type=int, nargs="+", default=[8], help="serve"),
            option("--batch", type=int, nargs="+", default=[1, 8], help="serve: images/request"),
            option("--decoder", default="greedy", choices=["greedy", "sample", "beam"]),
            option("--max-length", type=int, help="serve: words per caption (default: model's)"),
        ),
    ),  # fmt: skip
    Benchmark(
        "distributed",
        "distributed",
        "train_distributed ms/step: 1 process vs 2 loopback workers",
        options=(
            option("--steps", type=int, default=12, help="distributed: steps per epoch"),
            option("--global-batch", type=int, default=64, help="distributed: train.batch_size"),
        ),
    ),  # fmt: skip
    Benchmark("multi_worker_fit", "distributed", "Keras fit under MultiWorkerMirroredStrategy"),
    Benchmark(
        "convergence",
        "convergence",
        "test scores by demo size, budget, seed (dvc repro each)",
        options=(
            TRAIN_OVERRIDE,
            option("--sizes", type=int, nargs="+", default=[500, 2000, 4000], help="convergence"),
            option("--scale", type=float, nargs="+", default=[1.0, 2.0], help="convergence"),
            option("--seeds", type=int, nargs="+", default=[42, 43], help="convergence"),
            option(
                "--scratch",
                type=Path,
                help="convergence: the projects' folder (default /tmp/captioning-convergence)",
            ),
            option(
                "--results",
                type=Path,
                help="convergence: the results list, appended after "
                "each run, so a sweep resumes (default reports/convergence.json)",
            ),
            option("--replay", type=Path, nargs="+", help="convergence: history CSVs to replay"),
            option("--replay-budget", type=int, default=60000, help="convergence: their budget"),
        ),
    ),  # fmt: skip
)
BY_NAME = {b.name: b for b in REGISTRY}
