"""The one benchmark runner: `python -m benchmarks [NAME ...] [--quick] [--out FILE]`.

Runs the named benchmarks of `benchmarks.registry` in the registry's order (by
default those marked `default`: features, store, train, memory, decode), in one
process on one machine and one temporary workspace, prints each result as it
finishes and then every figure in one markdown table, and writes the report
(machine facts, sizes, each benchmark's figures, checks, rows, notes, wall time
and load average) to `--out`: JSON, or markdown when the name ends in `.md`.
`--quick` shrinks the data sizes (not the model) for a smoke run; on a GPU the
full run uses bigger sizes. `--list` shows every benchmark and `--help` their
options. Run it from the repository root: `benchmarks` is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.harness import machine_info, markdown_table
from benchmarks.registry import BY_NAME, REGISTRY
from benchmarks.workspace import BENCH_REPORT, FULL, GPU_SIZES, QUICK, VOCAB_SIZE, Workspace
from captioning.data.text import SPECIAL_TOKENS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME",
        help=f"benchmarks to run: {', '.join(BY_NAME)} (default: "
        f"{', '.join(b.name for b in REGISTRY if b.default)}); commas work too",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small data sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=BENCH_REPORT, help="report file (.json or .md)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--vocab-size", type=int, default=VOCAB_SIZE,
        help=f"vocabulary of the synthetic models ({VOCAB_SIZE} = the tokenize stage's "
        f"vocab_size + {len(SPECIAL_TOKENS)} specials)",
    )  # fmt: skip
    seen = set()
    for bench in REGISTRY:
        for flags, kwargs in bench.options:
            if flags not in seen:  # an option two benchmarks share is added once
                seen.add(flags)
                parser.add_argument(*flags, **kwargs)
    return parser


def _selected(parser: argparse.ArgumentParser, names: list[str]) -> list[str]:
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if not wanted:
        return [b.name for b in REGISTRY if b.default]
    if unknown := sorted(set(wanted) - set(BY_NAME)):
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BY_NAME)}")
    return [b.name for b in REGISTRY if b.name in wanted]


def run(names: list[str], options: argparse.Namespace) -> dict:
    """Run the named benchmarks in one workspace; return the JSON-ready report."""
    machine = machine_info()
    sizes = QUICK if options.quick else GPU_SIZES if machine["gpu"] else FULL
    report = {
        "quick": options.quick,
        "vocab_size": options.vocab_size,
        "sizes": dataclasses.asdict(sizes),
        "machine": machine,
        "benchmarks": {},
    }
    print(
        f"machine: {machine['cpu']} x {machine['cpus']}, GPU {machine['gpu']}; load average "
        f"{machine['load_average']:.2f} at start (timings on a busy machine are noisy)"
    )
    with tempfile.TemporaryDirectory(prefix="captioning-bench-") as tmp:
        ws = Workspace(Path(tmp), sizes, options)
        for name in names:
            load_before, started = os.getloadavg()[0], time.perf_counter()
            result = BY_NAME[name].function()(ws)
            entry = result.to_json()
            entry["wall_s"] = round(time.perf_counter() - started, 1)
            entry["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            result.notes.append(
                f"took {entry['wall_s']} s; 1-min load average "
                f"{entry['load_average'][0]:.2f} -> {entry['load_average'][1]:.2f}"
            )
            result.print()
            report["benchmarks"][name] = entry
    return report


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    options = parser.parse_args(argv)
    if options.list:
        for bench in REGISTRY:
            print(f"{bench.name:<17} {'default ' if bench.default else ''}{bench.summary}")
        return
    if options.vocab_size <= len(SPECIAL_TOKENS):
        parser.error(f"--vocab-size must be more than {len(SPECIAL_TOKENS)}")
    names = _selected(parser, options.names)
    if "decoders" in names:  # check before any benchmark runs, not after the others
        from benchmarks.decoders import decoder_inputs

        decoder_inputs(options.project, options.model)
    report = run(names, options)
    table = markdown_table(report)
    print("\n" + table)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    text = table if options.out.suffix == ".md" else json.dumps(report, indent=2) + "\n"
    options.out.write_text(text)
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
