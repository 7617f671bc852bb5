"""Every benchmark the runner knows: its name, its function, what it measures, its options.

A benchmark is one function `bench_NAME(ws: Workspace) -> Result` in a module
of this folder, and one `Benchmark` entry below: its name, that module
(imported only when it runs, so `--help` and the other benchmarks do not load
its libraries), a summary, whether a bare `python -m benchmarks` runs it (not
those that need a trained model, a server, worker processes or a DVC sweep),
and its command-line flags, read back from `ws.options`. The runner runs the
named ones in this order. `bench_spark` adapts `benchmarks.spark.spark_figures`
(a plain function of files and a model) to the runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

import yaml


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
        module = importlib.import_module(f"benchmarks.{self.module}")
        return getattr(module, f"bench_{self.name}")


def section_override(text: str) -> tuple[str, str, object]:
    """`train.key=value` or `evaluate.key=value` -> (section, key, YAML value), as `dvc exp run -S`."""
    dotted, _, value = text.partition("=")
    section, _, key = dotted.partition(".")
    if section not in ("train", "evaluate") or not key:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected train.KEY=VALUE or evaluate.KEY=VALUE"
        )
    return section, key, yaml.safe_load(value)


PROJECT = option(
    "--project", type=Path,
    help="decoders, architectures: the pipeline folder read (default: this repository; "
    "--smoke: a tiny one of its own)",
)  # fmt: skip
OVERRIDE = option(
    "-S", "--set", dest="overrides", action="append", default=[], type=section_override,
    metavar="SECTION.KEY=VALUE",
    help="architectures, convergence (train only), selection: a param for every run",
)  # fmt: skip
RESULTS = option(
    "--results", type=Path,
    help="convergence, selection: their results file (default reports/NAME.json), "
    "written after each run so a sweep resumes",
)  # fmt: skip


def bench_spark(ws):
    """Spark's batch captioning and extraction against one process (benchmarks.spark)."""
    from benchmarks.harness import Result
    from benchmarks.spark import spark_figures

    count = 4 if ws.smoke else 16 if ws.quick else 64
    table = ws.images(count)
    keras_path, model = ws.pyfunc_model("spark")
    figures = spark_figures(
        [Path(p) for p in table["path"]], keras_path, str(model), table,
        image_size=ws.sizes.image_size, batch_size=ws.sizes.feature_batch,
    )  # fmt: skip
    result = Result(f"spark: {count} demo images, local[2] vs one process")
    for name, value in figures.items():
        result.add(name, value, "x" if "_over_" in name else "images/s")
    return result


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
            OVERRIDE,
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
            OVERRIDE,
            RESULTS,
            option("--sizes", type=int, nargs="+", default=[500, 2000, 4000], help="convergence"),
            option("--scale", type=float, nargs="+", default=[1.0, 2.0], help="convergence"),
            option("--seeds", type=int, nargs="+", default=[42, 43], help="convergence"),
            option(
                "--scratch",
                type=Path,
                help="convergence: the projects' folder (default /tmp/captioning-convergence)",
            ),
            option("--replay", type=Path, nargs="+", help="convergence: history CSVs to replay"),
            option("--replay-budget", type=int, default=60000, help="convergence: their budget"),
        ),
    ),  # fmt: skip
    Benchmark(
        "selection",
        "selection",
        "val CIDEr of candidate defaults over data sets and seeds (make select)",
        options=(
            OVERRIDE,
            RESULTS,
            option("--images", type=int, default=1000, help="selection: N (demo: N and 2N)"),
            option("--repeats", type=int, default=3, help="selection: seeds per candidate"),
            option("--experiments", nargs="+", help="selection: of its EXPERIMENTS (default all)"),
            option(
                "--data-sets",
                nargs="+",
                default=["demo", "demo2x", "scenes"],
                help="selection: of demo, demo2x, scenes",
            ),
            option("--candidates", nargs="*", default=[], help="selection: keep only these"),
            option("--cache", type=Path, help="selection: runs' cache (default data/selection)"),
        ),
    ),  # fmt: skip
    Benchmark("serve_memory", "serve_memory", "served model RSS under 16 clients x 16 photos"),
    Benchmark("spark", "registry", "Spark batch captioning and extraction vs one process"),
)
BY_NAME = {b.name: b for b in REGISTRY}
