"""Speed, memory and decoder benchmarks: `python -m benchmarks.run [--quick] [--only NAME]`.

Five benchmarks run by default, all measured in one run on one machine, each
printed with its target and PASS/FAIL, and written together to `reports/bench.json`:

- features: `extract_features` end to end (demo JPEGs on disk -> float16 store)
  against the bare InceptionV3 forward pass on an in-memory batch;
- store: bytes on disk per image of that store, index and manifest included;
- train: caption pairs/s of the project's compiled whole-sequence step
  (`Captioner.fit`) against the tutorial's Python loop over time steps;
- memory: peak RSS of extraction and of training, each in a child process, at
  two data set sizes (features are memory-mapped and batches streamed, so it
  should not grow with the data);
- decode: captions/s of batched greedy decoding against one image at a time.

Features, train and decode also print the model FLOPs per item (counted from
the layers' shapes), the GFLOP/s achieved and their share of the machine's
peak, a large float32 matmul timed in the same benchmark (`benchmarks.flops`).

A sixth, `--only decoders` (`make bench-decoders`), needs the pipeline's
outputs (`make repro`): it scores greedy, beam 3 and beam 5 on the evaluate
split with the evaluate stage's own `evaluate_split`, and times each decoder.

Timings on a shared machine are noisy: the load average is recorded with the
figures. `--quick` shrinks the data sizes (not the model) for a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.decode import bench_decode, bench_decoders, decoder_inputs
from benchmarks.features import bench_features, bench_store
from benchmarks.memory import bench_memory
from benchmarks.results import format_value, machine_info
from benchmarks.train import bench_train
from benchmarks.workspace import (
    BENCH_REPORT,
    CAPTION_TABLE,
    FEATURES_DIR,
    FULL,
    MODEL_FILE,
    PARAMS_FILE,
    QUICK,
    RAW_DIR,
    REPO_ROOT,
    VOCAB_SIZE,
    Sizes,
    Workspace,
)
from captioning.data.text import SPECIAL_TOKENS

RUNNERS = {
    "features": bench_features,
    "store": bench_store,
    "train": bench_train,
    "memory": bench_memory,
    "decode": bench_decode,
    "decoders": bench_decoders,  # needs a trained model: --only decoders
}
BENCHMARKS = tuple(RUNNERS)
DEFAULT_BENCHMARKS = tuple(name for name in BENCHMARKS if name != "decoders")


def _selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(DEFAULT_BENCHMARKS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return [n for n in BENCHMARKS if n in names]  # features before store: store reuses its output


def run(
    names: list[str],
    sizes: Sizes,
    vocab_size: int,
    quick: bool,
    pipeline: dict[str, Path] | None = None,
) -> dict:
    """Run the named benchmarks in order; return the JSON-ready report."""
    demo_images = max(
        sizes.feature_images if {"features", "store"} & set(names) else 0,
        sizes.memory_images[1] if "memory" in names else 0,
    )
    report = {
        "quick": quick,
        "vocab_size": vocab_size,
        "sizes": dataclasses.asdict(sizes),
        "machine": machine_info(),
        "benchmarks": {},
    }
    print(
        f"machine: {report['machine']['cpu']} x {report['machine']['cpus']}; "
        f"load average at start {os.getloadavg()[0]:.2f} (timings on a busy machine are noisy)"
    )
    with tempfile.TemporaryDirectory(prefix="captioning-bench-") as tmp:
        ws = Workspace(Path(tmp), sizes, vocab_size, demo_images, pipeline)
        for name in names:
            report["benchmarks"][name] = _run_one(name, ws)
    return report


def _run_one(name: str, ws: Workspace) -> dict:
    """One benchmark's JSON entry, with its wall time and the load average around it; printed."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = RUNNERS[name](ws)
    entry = result.to_json()
    entry["wall_s"] = round(time.perf_counter() - started, 1)
    load_after = os.getloadavg()[0]
    entry["load_average"] = [round(load_before, 2), round(load_after, 2)]
    result.notes.append(
        f"took {entry['wall_s']} s; 1-min load average {load_before:.2f} -> {load_after:.2f}"
    )
    entry["notes"] = result.notes
    result.print()
    return entry


def _summary(report: dict) -> None:
    rows = [
        (name, check["figure"], format_value(entry["figures"][check["figure"]]), check)
        for name, entry in report["benchmarks"].items()
        for check in entry["checks"]
    ]
    width = max((len(figure) for _, figure, _, _ in rows), default=0)
    print("\n== summary")
    for name, figure, text, check in rows:
        verdict = "PASS" if check["pass"] else "FAIL"
        print(f"  {name:<9} {figure:<{width}} {text:>10}  target {check['target']:<11} {verdict}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small data sizes: a ~2 minute smoke run"
    )
    parser.add_argument(
        "--only", action="append", metavar="NAME",
        help=f"run only these benchmarks (repeat or comma-separate): {', '.join(BENCHMARKS)}; "
        f"the default runs {', '.join(DEFAULT_BENCHMARKS)}",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=BENCH_REPORT, help="where to write the JSON")
    parser.add_argument(
        "--vocab-size", type=int, default=VOCAB_SIZE,
        help=f"vocabulary size of the train/decode models ({VOCAB_SIZE} = the tokenize stage's "
        f"vocab_size + {len(SPECIAL_TOKENS)} specials; the demo data set has about 70)",
    )  # fmt: skip
    parser.add_argument(
        "--project", type=Path, default=REPO_ROOT,
        help=f"decoders: the pipeline folder whose {PARAMS_FILE}, {FEATURES_DIR}/, "
        f"{CAPTION_TABLE} and {RAW_DIR}/ are read (default: this repository)",
    )  # fmt: skip
    parser.add_argument(
        "--model", type=Path, default=None,
        help=f"decoders: the .keras captioner to score (default: PROJECT/{MODEL_FILE})",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.vocab_size <= len(SPECIAL_TOKENS):
        parser.error(f"--vocab-size must be more than {len(SPECIAL_TOKENS)}")
    names = _selected(args.only)
    pipeline = None
    if "decoders" in names:  # check before any benchmark runs, not after the others
        pipeline = decoder_inputs(args.project, args.model or args.project / MODEL_FILE)
    report = run(names, QUICK if args.quick else FULL, args.vocab_size, args.quick, pipeline)
    _summary(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
