"""Smoke test of the benchmark suite: the cheapest benchmark runs and writes the report shape.

No timing assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_store_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "store", "--out", str(out)],
        cwd=REPO_ROOT,  # `benchmarks` is a folder of the repository, not an installed package
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
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
