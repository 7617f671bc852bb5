"""Quality gate: does this run's reports/metrics.json meet the floors and hold up against a base?

`captioning gate` (and `make gate`) compares the metrics of a run with two things
from the `gates:` section of params.yaml: absolute `floors` (a metric below its
floor fails) and per-metric `tolerances`, the largest absolute drop allowed
against a base run (the base branch's metrics). Every gated metric is
higher-is-better. A metric absent from the run fails as `missing`. A rise
larger than the tolerance is marked `improved` (it passes). Without a base only
the floors are checked, and the table says so.

The base comes from a file (`--base-metrics`, e.g. the metrics CI recorded for
the base commit) or from a git revision via `dvc metrics diff REF`
(`--base-ref`). Everything here but `base_metrics_from_ref` is pure: it takes
mappings and returns values, so the tests feed it real metrics files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from captioning.config import GatesParams

# Comparisons allow for float noise from JSON round trips: a drop of exactly
# the tolerance passes, and equal metrics never count as a change.
EPSILON = 1e-9

# Numbers in metrics.json that describe the run rather than its quality: never
# gated, but a difference between base and run means they are not like for like.
RUN_SHAPE = ("num_images",)


class GateError(Exception):
    """The gate could not run (unreadable metrics, unknown base revision): exit 2."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One gated metric: its values and verdict (pass, improved, fail or missing)."""

    metric: str
    pr: float | None
    base: float | None
    floor: float | None
    tolerance: float | None
    verdict: str
    reason: str = ""

    @property
    def change(self) -> float | None:
        if self.pr is None or self.base is None:
            return None
        return self.pr - self.base

    @property
    def failed(self) -> bool:
        return self.verdict in ("fail", "missing")


@dataclasses.dataclass(frozen=True)
class GateResult:
    """Every gated metric's row, what the base was, and notes for the reader."""

    rows: list[Row]
    base_label: str | None  # None: no base, floors only
    notes: list[str]
    pr_label: str = "the metrics file"

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if row.failed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def load_metrics(path: str | Path) -> dict[str, Any]:
    """The metrics JSON object in `path`; a missing or malformed file is a GateError."""
    path = Path(path)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateError(f"{path} not found: run the pipeline first (`make repro`)") from None
    except json.JSONDecodeError as err:
        raise GateError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise GateError(f"{path}: expected a JSON object of metrics, got {type(loaded).__name__}")
    return loaded


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics mapping (strings, mappings, booleans, NaN dropped)."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def _dvc() -> str:
    # The dvc beside this interpreter (the project's virtualenv), else the one on PATH.
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def base_metrics_from_ref(ref: str, metrics_path: str | Path) -> dict[str, float] | None:
    """The numeric metrics of `metrics_path` at git revision `ref`, via `dvc metrics diff`.

    None when the file does not exist at `ref` (the first run on a branch); an
    unknown revision or a failing dvc is a GateError.
    """
    done = subprocess.run(
        [_dvc(), "metrics", "diff", ref, "--all", "--json", "--targets", str(metrics_path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise GateError(f"`dvc metrics diff {ref}` failed: {message}")
    diff = json.loads(done.stdout or "{}")
    # One entry, keyed by the path relative to the repository root: {metric: {old, new, diff}}.
    old = {
        name: values.get("old")
        for entries in diff.values()
        for name, values in entries.items()
        if isinstance(values, dict)
    }
    found = numeric({k: v for k, v in old.items() if v is not None})
    return found or None


def _missing_reason(metric: str, metrics: Mapping[str, Any], label: str) -> str | None:
    """Why `metric` has no usable value in `metrics` (read from `label`), or None."""
    skipped = metrics.get("skipped")
    if metric not in metrics:
        if isinstance(skipped, Mapping) and metric in skipped:
            return f"skipped by evaluate: {skipped[metric]}"
        return f"{metric} is not in {label}"
    value = metrics[metric]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"not a number: {value!r}"
    if not math.isfinite(value):
        return f"not a finite number: {value}"
    return None


def _gated_metrics(gates: GatesParams) -> list[str]:
    # The order of params.yaml: tolerances first, then floors that have none.
    return list(dict.fromkeys([*gates.tolerances, *gates.floors]))


def judge(
    metric: str,
    pr: Mapping[str, Any],
    base: Mapping[str, float] | None,
    gates: GatesParams,
    pr_label: str = "the metrics file",
) -> Row:
    """The verdict on one metric of run `pr` against its floor and the `base` run."""
    floor = gates.floors.get(metric)
    tolerance = gates.tolerances.get(metric)
    base_value = base.get(metric) if base else None
    missing = _missing_reason(metric, pr, pr_label)
    if missing is not None:
        return Row(metric, None, base_value, floor, tolerance, "missing", missing)

    value = float(pr[metric])
    failures = []
    if floor is not None and value < floor - EPSILON:
        failures.append(f"below floor {floor:.4f}")
    improved = False
    if base_value is not None:
        change = value - base_value
        allowed = tolerance if tolerance is not None else 0.0
        if tolerance is not None and change < -tolerance - EPSILON:
            failures.append(f"dropped {-change:.4f} > tolerance {tolerance:.4f}")
        improved = change > allowed + EPSILON
    if failures:
        return Row(metric, value, base_value, floor, tolerance, "fail", "; ".join(failures))
    if improved:
        return Row(metric, value, base_value, floor, tolerance, "improved", "")
    reason = "no base value" if base is not None and base_value is None else ""
    return Row(metric, value, base_value, floor, tolerance, "pass", reason)


def compare(
    pr: Mapping[str, Any],
    base: Mapping[str, float] | None,
    gates: GatesParams,
    base_label: str | None = None,
    pr_label: str = "the metrics file",
) -> GateResult:
    """Judge every metric named in `gates` (floors and tolerances) for run `pr`.

    `base` is the base run's numeric metrics, or None to check the floors only.
    """
    notes = []
    if base is None:
        notes.append("No base metrics: compared with the floors only.")
    else:
        ours_all = numeric(pr)
        for name in RUN_SHAPE:
            theirs, ours = base.get(name), ours_all.get(name)
            if theirs is not None and ours is not None and theirs != ours:
                notes.append(
                    f"The base has {name}={theirs:g}, this run {name}={ours:g}: "
                    "the comparison is not like for like."
                )
    if not gates.floors and not gates.tolerances:
        notes.append("params.yaml `gates:` names no metric: nothing is gated.")
    rows = [judge(metric, pr, base, gates, pr_label) for metric in _gated_metrics(gates)]
    return GateResult(rows, base_label if base is not None else None, notes, pr_label)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _change(row: Row) -> str:
    change = row.change
    if change is None:
        return "—"
    if abs(change) <= EPSILON:
        return "0"
    percent = f" ({change / row.base:+.1%})" if row.base else ""
    return f"{change:+.4f}{percent}"


def _verdict(row: Row) -> str:
    word = f"**{row.verdict}**" if row.failed else row.verdict
    return f"{word}: {row.reason}" if row.reason else word


def markdown_table(result: GateResult) -> str:
    """The gate as Markdown: a headline, the base, one table row per metric, then notes."""
    failures = result.failures
    if failures:
        names = ", ".join(row.metric for row in failures)
        headline = f"### Quality gate: failed ({len(failures)} of {len(result.rows)}: {names})"
    else:
        improved = sum(row.verdict == "improved" for row in result.rows)
        headline = f"### Quality gate: passed ({len(result.rows)} metrics, {improved} improved)"
    base = f"`{result.base_label}`" if result.base_label else "none"
    lines = [
        headline,
        "",
        f"Base: {base}. PR: `{result.pr_label}`. Floors and tolerances: `params.yaml` `gates:`.",
        "",
        "| metric | base | PR | change | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.metric} | {_number(row.base)} | {_number(row.pr)} | {_change(row)} "
            f"| {_verdict(row)} |"
        )
    if result.notes:
        lines.append("")
        lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def summary(result: GateResult) -> str:
    """One line for a log: which metrics failed and why, or that all passed."""
    if result.passed:
        return f"gate passed: {len(result.rows)} metrics"
    reasons = [f"{row.metric} {row.verdict} ({row.reason})" for row in result.failures]
    return "gate failed: " + "; ".join(reasons)


def run_gate(
    metrics_path: str | Path,
    gates: GatesParams,
    base_ref: str | None = None,
    base_metrics_path: str | Path | None = None,
) -> GateResult:
    """Load the run's metrics and its base (a file, a git revision or none) and compare."""
    pr = load_metrics(metrics_path)
    base: dict[str, float] | None = None
    label: str | None = None
    if base_metrics_path is not None:
        base, label = numeric(load_metrics(base_metrics_path)), str(base_metrics_path)
    elif base_ref is not None:
        base, label = base_metrics_from_ref(base_ref, metrics_path), base_ref
    result = compare(pr, base, gates, label, str(metrics_path))
    if base is None and base_ref is not None:
        note = f"{metrics_path} does not exist at `{base_ref}` (first run there?)."
        result = dataclasses.replace(result, notes=[note, *result.notes])
    return result
