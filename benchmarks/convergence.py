"""Does the training budget converge on every data size? `python -m benchmarks convergence`.

For each demo size it builds a throwaway DVC project (this checkout's
dvc.yaml, params.yaml, stages/ and src/, `dvc init --no-scm`) with
`data.demo_train_images` set, runs `dvc repro tokenize` once (download,
validate, features, tokenize), then for every (budget, seed) runs
`dvc repro evaluate` (train and evaluate: the pipeline's own stages, at the
project's defaults otherwise) and records the test split's CIDEr, BLEU-4 and
object accuracy, the epochs run, whether the run stopped early or ended
still improving, and the wall time of train + evaluate.

    python -m benchmarks convergence --sizes 500 2000 4000 --scale 1 2 --seeds 42 43

runs the default budget with each seed and twice the budget with the first
seed (`--scale` multiplies params.yaml's `train.budget_pairs`; `-S
train.KEY=VALUE` sets another `train` param for every run, e.g.
`-S train.early_stopping_pairs=0` to run whole budgets). `--replay HISTORY.csv
...` replays the early-stopping rules on recorded histories instead. Each
finished run is appended to `--results` at once (a JSON list), so a long
sweep that is stopped keeps what it measured; a run already there is not
repeated. The per-epoch histories are copied next to it. `--quick` runs one
seed of one 24-image project at the pipeline tests' tiny sizes.
docs/experiments.md has the table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.harness import Result
from benchmarks.workspace import REPO_ROOT

VENV_BIN = Path(sys.executable).parent
DEFAULT_SCRATCH = Path("/tmp/captioning-convergence")
DEFAULT_RESULTS = REPO_ROOT / "reports" / "convergence.json"
COPIED = ("dvc.yaml", "params.yaml", "stages", "src")
QUICK_SIZE = 24
QUICK_PARAMS = {  # as tests/pipeline_fixtures.py's TINY_PARAMS: the pipeline in a minute or two
    "data": {"demo_val_images": 12},
    "features": {"batch_size": 8, "shard_size": 16},
    "train": {"budget_pairs": 32, "epoch_pairs": 16, "batch_size": 16, "units": 32,
              "attention_units": 32, "embedding_dim": 16, "encoder_dim": 16},
    "evaluate": {"batch_size": 8},
}  # fmt: skip


def prepare(root: Path, train_images: int, quick: bool) -> None:
    """A DVC project with `train_images` demo images, run up to tokenize (skipped when done)."""
    if (root / "data" / "tokens" / "vocab.json").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source, target = REPO_ROOT / name, root / name
        if source.is_dir():
            shutil.copytree(
                source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(source, target)
    if not (root / ".dvc").exists():
        dvc(root, "init", "--no-scm", "-q")
    changes = QUICK_PARAMS if quick else {}
    set_params(
        root, {**changes, "data": {**changes.get("data", {}), "demo_train_images": train_images}}
    )
    dvc(root, "repro", "tokenize")


def set_params(root: Path, changes: dict[str, dict]) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(root: Path, *args: str) -> None:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=root, env=env, check=True)


def run_one(root: Path, budget: int, seed: int, histories: Path, extra: dict | None = None) -> dict:
    """train + evaluate at `budget` pairs and `seed`; the test figures and the run's summary.

    `extra`: more `train` params for this run (`--set`).
    """
    set_params(root, {"train": {"budget_pairs": budget, "seed": seed, **(extra or {})}})
    start = time.perf_counter()
    dvc(root, "repro", "evaluate")
    wall = time.perf_counter() - start
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    state = json.loads((root / "models" / "checkpoints" / "state.json").read_text())
    history = state["history"]
    histories.mkdir(parents=True, exist_ok=True)
    suffix = "".join(f"-{k}={v}" for k, v in sorted((extra or {}).items()))
    shutil.copy2(
        root / "reports" / "train_history.csv",
        histories / f"{root.name}-{budget}-{seed}{suffix}.csv",
    )
    from captioning.config import load_section
    from captioning.training.budget import StoppingRule

    rule = StoppingRule.of(load_section("train", root / "params.yaml"))
    values = [row[rule.monitor] for row in history]
    return {
        "test_CIDEr": metrics["CIDEr"],
        "test_BLEU-4": metrics["BLEU-4"],
        "test_object_accuracy": metrics.get("object_accuracy"),
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_val": state["best"],
        "stopped_early": state.get("stopped", False),
        "still_improving": not state.get("stopped", False) and rule.still_improving(values),
        "train_evaluate_s": round(wall, 1),
    }


def replay(values: list[float], rule, pairs_per_epoch: int) -> tuple[int, float]:
    """Where `rule` would have stopped a run with these per-epoch val values: (epoch, best so far).

    Early stopping only ends a run, so replaying it on a longer run's history
    says what it would have kept.
    """
    for epoch in range(1, len(values) + 1):
        if rule.stops(values[:epoch], pairs_per_epoch):
            return epoch, max(values[:epoch])
    return len(values), max(values)


def replay_table(histories: list[Path], budget: int) -> list[dict]:
    """The stopping rules side by side on recorded histories of `budget` pairs (`--replay`)."""
    from captioning.training.budget import StoppingRule
    from captioning.training.checkpoints import read_history

    rows = []
    for path in histories:
        history = read_history(path)
        values = [row["val_CIDEr"] for row in history]
        per_epoch = int(history[0]["pairs_seen"])
        half = budget // 2
        rules = {
            "raw, patience 3 epochs of 2,000 pairs (the old default)": StoppingRule(
                "val_CIDEr", 1, 0.0, 3 * 2000, 0
            ),
            "raw, patience 15,000 pairs": StoppingRule("val_CIDEr", 1, 0.0, 15000, 0),
            "mean of 3, min_delta 0.01, patience 9,000 pairs": StoppingRule(
                "val_CIDEr", 3, 0.01, 9000, 0
            ),
            "mean of 3, min_delta 0.01, patience 15,000 pairs": StoppingRule(
                "val_CIDEr", 3, 0.01, 15000, 0
            ),
            "mean of 3, min_delta 0.01, patience 15,000 pairs, not before half (default)": (
                StoppingRule("val_CIDEr", 3, 0.01, 15000, half)
            ),
        }
        for name, rule in rules.items():
            epoch, best = replay(values, rule, per_epoch)
            rows.append(
                {
                    "history": path.name,
                    "rule": name,
                    "stops_after_pairs": epoch * per_epoch,
                    "of_pairs": len(values) * per_epoch,
                    "best_val_CIDEr_kept": round(best, 3),
                    "best_val_CIDEr_whole_run": round(max(values), 3),
                }
            )
    return rows


def bench_convergence(ws) -> Result:
    o = ws.options
    if o.replay:
        result = Result(f"convergence: stopping rules replayed on {len(o.replay)} histories")
        for row in replay_table(o.replay, o.replay_budget):
            result.add_row({"run": f"{row.pop('history')}: {row.pop('rule')}", **row})
        return result
    sizes, seeds, scales = ([QUICK_SIZE], [42], [1.0]) if ws.quick else (o.sizes, o.seeds, o.scale)
    scratch = o.scratch or (ws.root / "convergence" if ws.quick else DEFAULT_SCRATCH)
    results = o.results or (ws.root / "convergence.json" if ws.quick else DEFAULT_RESULTS)
    extra = dict(o.overrides)
    done = json.loads(results.read_text()) if results.exists() else []
    # Default budget with every seed, larger ones with the first: seed spread and budget gain.
    plan = [(s, 1.0, seed) for s in sizes for seed in seeds if 1.0 in scales]
    plan += [(s, scale, seeds[0]) for s in sizes for scale in scales if scale != 1.0]
    plan.sort(key=lambda item: sizes.index(item[0]))
    result = Result(f"convergence: test scores of train + evaluate, {len(plan)} runs, {extra}")
    for size, scale, seed in plan:
        root = scratch / f"demo{size}"
        prepare(root, size, ws.quick)
        base = yaml.safe_load((root / "params.yaml").read_text())["train"]["budget_pairs"]
        key = {"train_images": size, "budget_pairs": int(base * scale), "seed": seed, **extra}
        row = next((r for r in done if all(r.get(k) == v for k, v in key.items())), None)
        if row is None:
            row = {**key, **run_one(root, key["budget_pairs"], seed, results.parent / "convergence",
                                    extra)}  # fmt: skip
            done.append(row)
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(done, indent=2) + "\n")
        label = f"{size} images, {key['budget_pairs']} pairs, seed {seed}"
        result.add_row({"run": label, **{k: v for k, v in row.items() if k not in key}})
    result.notes.append(f"results appended to {results}; projects in {scratch}")
    return result
