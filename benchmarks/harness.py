"""What every benchmark shares: its `Result`, timing, memory sampling, the machine, one table.

A benchmark returns one `Result`: named figures with units, checks of some of
them against targets (PASS/FAIL), an optional table of variants (`rows`), and
notes. `timed` runs a function after warm-ups and keeps each repeat (median and
spread); `seconds` times one call and `BatchClock` each Keras training batch.
`PeakSampler` samples a memory reading in a thread (`status_kib` of this
process, or a server's process tree). `machine_info` records the CPU, the GPU
if any, the library versions and the load, since timings mean little without
the machine that made them; `markdown_table` writes a whole report as one table.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import keras
import tensorflow as tf


class Result:
    """Figures of one benchmark, the checks against its targets, a table of variants, notes."""

    def __init__(self, title: str):
        self.title = title
        self.figures: dict[str, float | int | str] = {}
        self.units: dict[str, str] = {}
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.rows: list[dict] = []

    def add(self, name: str, value, unit: str = "") -> None:
        self.figures[name] = value
        self.units[name] = unit

    def add_row(self, row: dict) -> None:
        self.rows.append(row)

    def check(self, name: str, target: str, passed: bool) -> None:
        self.checks.append({"figure": name, "target": target, "pass": bool(passed)})

    def to_json(self) -> dict:
        keys = ("title", "figures", "units", "checks", "notes") + (("rows",) if self.rows else ())
        return {key: getattr(self, key) for key in keys}

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
            columns = list(dict.fromkeys(key for row in self.rows for key in row))
            cells = [[format_value(row.get(c, "n/a")) for c in columns] for row in self.rows]
            widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
            for line in (columns, *cells):
                print(
                    "  " + "  ".join(f"{text:>{w}}" for text, w in zip(line, widths, strict=True))
                )
        for note in self.notes:
            print(f"  note: {note}")
        sys.stdout.flush()


def format_value(value) -> str:
    """Four significant figures for small floats, whole numbers with separators otherwise."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of each timed repeat."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how much the repeats disagree."""
        return (max(self.samples) - min(self.samples)) / self.median


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Seconds of `repeats` calls of `fn`, after `warmup` untimed ones (tracing, caches)."""
    for _ in range(warmup):
        fn()
    return Timing(tuple(seconds(fn) for _ in range(repeats)))


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class BatchClock(keras.callbacks.Callback):
    """When each training batch ends (`ends`), and each batch's seconds after the first epoch."""

    def __init__(self):
        super().__init__()
        self.ends: list[float] = []
        self.after_first_epoch: list[float] = []
        self._epoch, self._start = 0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())
        if self._epoch > 0:  # the first epoch compiles
            self.after_first_epoch.append(self.ends[-1] - self._start)


# ----------------------------------------------------------------------------- memory


class PeakSampler:
    """Calls `read` (a size, or None) every `period` seconds in a thread while in the block."""

    def __init__(self, read: Callable[[], int | None], period: float):
        self.read, self.period = read, period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if (value := self.read()) is not None:
                self.samples.append(value)
            self._stop.wait(self.period)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def status_kib(field: str, pid: int | str = "self") -> int:
    """A kiB field of /proc/PID/status (VmHWM, RssAnon, VmRSS); 0 when absent."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ----------------------------------------------------------------------------- the machine


def gpu_info() -> dict:
    """The first GPU TensorFlow sees (name, compute capability, TF32 on or off), or none."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"gpu": None, "gpus": 0}
    details = tf.config.experimental.get_device_details(gpus[0])
    return {
        "gpu": details.get("device_name", gpus[0].name),
        "gpus": len(gpus),
        "compute_capability": list(details.get("compute_capability", ())),
        # On Ampere and later TensorFlow runs float32 matmuls as TF32 by default,
        # in the model and in the peak alike.
        "tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
    }


def machine_info() -> dict:
    """CPU model and count, GPU, platform, library versions and the load average now."""
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        **gpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "load_average": round(os.getloadavg()[0], 2),
    }


# ----------------------------------------------------------------------------- one table


def report_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, figure, value, unit, target and verdict) for every figure and table cell."""
    out = []
    for name, entry in report["benchmarks"].items():
        checks = {c["figure"]: c for c in entry["checks"]}
        for figure, value in entry["figures"].items():
            check = checks.get(figure)
            verdict = f"{check['target']} {'PASS' if check['pass'] else 'FAIL'}" if check else ""
            out.append((name, figure, format_value(value), entry["units"][figure], verdict))
        for row in entry.get("rows", []):
            label, *cells = row.items()  # a row's first column names it
            out += [(name, f"{label[1]}: {k}", format_value(v), "", "") for k, v in cells]
    return out


def markdown_table(report: dict) -> str:
    """The whole report as one markdown table, with the machine it ran on."""
    m = report["machine"]
    lines = [
        f"{m['cpu']} x {m['cpus']}, GPU {m['gpu']}, TensorFlow {m['tensorflow']}, "
        f"load average {m['load_average']} at start, quick={report['quick']}",
        "",
        "| benchmark | figure | value | unit | target |",
        "|---|---|---|---|---|",
    ]
    lines += [
        "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        for cells in report_rows(report)
    ]
    return "\n".join(lines) + "\n"
