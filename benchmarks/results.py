"""How a benchmark reports: its figures, the checks against its targets, and the machine.

A benchmark returns one `Result`: named figures with units, checks of some of
them against targets (PASS/FAIL), an optional table comparing variants, and
notes for the reader. The run prints each result as it finishes and writes them
all to one JSON file together with `machine_info()`, since timings mean little
without the machine that made them. `seconds` is the one timing helper.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable

import keras
import tensorflow as tf


class Result:
    """Figures of one benchmark, the checks against its targets, and notes for the reader."""

    def __init__(self, title: str):
        self.title = title
        self.figures: dict[str, float | int | str] = {}
        self.units: dict[str, str] = {}
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.rows: list[dict] = []  # a table, for benchmarks that compare variants

    def add_row(self, row: dict) -> None:
        self.rows.append(row)

    def add(self, name: str, value, unit: str = "") -> None:
        self.figures[name] = value
        self.units[name] = unit

    def check(self, name: str, target: str, passed: bool) -> None:
        self.checks.append({"figure": name, "target": target, "pass": bool(passed)})

    def to_json(self) -> dict:
        out = {
            "title": self.title,
            "figures": self.figures,
            "units": self.units,
            "checks": self.checks,
            "notes": self.notes,
        }
        if self.rows:
            out["rows"] = self.rows
        return out

    def print(self) -> None:
        print(f"\n== {self.title}")
        targets = {c["figure"]: c for c in self.checks}
        for name, value in self.figures.items():
            line = f"  {name:<48} {format_value(value):>14} {self.units[name]:<10}"
            if name in targets:
                verdict = "PASS" if targets[name]["pass"] else "FAIL"
                line += f" target {targets[name]['target']:<12} {verdict}"
            print(line.rstrip())
        if self.rows:
            self._print_rows()
        for note in self.notes:
            print(f"  note: {note}")
        sys.stdout.flush()

    def _print_rows(self) -> None:
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        cells = [[format_value(row.get(c, "n/a")) for c in columns] for row in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        for line in (columns, *cells):
            print("  " + "  ".join(f"{text:>{w}}" for text, w in zip(line, widths, strict=True)))


def format_value(value) -> str:
    """Four significant figures for small floats, whole numbers with separators otherwise."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine_info() -> dict:
    """CPU model and count, platform and the library versions the figures depend on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(
                (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), ""
            )
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
