"""Does the training budget converge on every data size? `python -m benchmarks.convergence`.

For each demo size it builds a throwaway DVC project (this checkout's
dvc.yaml, params.yaml, stages/ and src/, `dvc init --no-scm`) with
`data.demo_train_images` set, runs `dvc repro tokenize` once (download,
validate, features, tokenize), then for every (budget, seed) runs
`dvc repro evaluate` (train and evaluate: the pipeline's own stages, at the
project's defaults otherwise) and records the test split's CIDEr, BLEU-4 and
object accuracy, the epochs run, whether the run stopped early or ended
still improving, and the wall time of train + evaluate.

    python -m benchmarks.convergence --sizes 500 2000 4000 --scale 1 2 --seeds 42 43

runs the default budget with each seed and twice the budget with the first
seed (`--scale` multiplies params.yaml's `train.budget_pairs`; `--set
KEY=VALUE` sets another `train` param for every run, e.g.
`early_stopping_pairs=0` to run whole budgets). `--replay HISTORY.csv ...`
replays the early-stopping rules on recorded histories instead. Each finished
run is appended to `--out` at once (a JSON list), so a long sweep that is
stopped keeps what it measured; a run already there is not repeated. The
per-epoch histories are copied next to it. docs/experiments.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.workspace import REPO_ROOT

VENV_BIN = Path(sys.executable).parent
COPIED = ("dvc.yaml", "params.yaml", "stages", "src")


def prepare(root: Path, train_images: int) -> None:
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
    set_params(root, {"data": {"demo_train_images": train_images}})
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 4000])
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/captioning-convergence"))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "convergence.json")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="another train param for every run (YAML value), e.g. early_stopping_pairs=0",
    )  # fmt: skip
    parser.add_argument(
        "--replay", type=Path, nargs="+", help="history CSVs: replay the stopping rules on them"
    )
    parser.add_argument("--replay-budget", type=int, default=60000, help="their runs' budget")
    args = parser.parse_args(argv)
    if args.replay:
        for row in replay_table(args.replay, args.replay_budget):
            print(json.dumps(row))
        return
    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["budget_pairs"]
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    # Default budget with every seed, larger ones with the first: seed spread and budget gain.
    plan = [(s, 1.0, seed) for s in args.sizes for seed in args.seeds if 1.0 in args.scale]
    plan += [(s, scale, args.seeds[0]) for s in args.sizes for scale in args.scale if scale != 1.0]
    plan.sort(key=lambda item: args.sizes.index(item[0]))
    for size, scale, seed in plan:
        budget = int(base * scale)
        key = {"train_images": size, "budget_pairs": budget, "seed": seed, **extra}
        if any(all(row.get(k) == v for k, v in key.items()) for row in done):
            continue
        root = args.scratch / f"demo{size}"
        prepare(root, size)
        histories = args.out.parent / "convergence"
        result = {**key, **run_one(root, budget, seed, histories, extra)}
        print(json.dumps(result), flush=True)
        done.append(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(done, indent=2) + "\n")


if __name__ == "__main__":
    main()
