"""A sweep's parent MLflow run, under which each of its experiments' training runs nests.

`make sweep` opens the parent (`python -m captioning.tracking.sweeps open`),
runs the queued DVC experiments with its id in CAPTIONING_SWEEP_RUN_ID, and
closes it with their exit status. The train stage reads that variable when it
opens a new run (`parent_run_id`); a resumed run keeps the parent it had. In
MLflow's runs table the sweep is one row that unfolds into its runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlflow

from captioning.tracking import runs

SWEEP_RUN_ENV = "CAPTIONING_SWEEP_RUN_ID"


def parent_run_id() -> str | None:
    """The id of the sweep this process trains for, if `make sweep` started it."""
    return os.environ.get(SWEEP_RUN_ENV) or None


def open_sweep(repo_root: str | Path, grid: str) -> str:
    """Create the sweep's parent run (left RUNNING) in the project's experiment; its id."""
    runs.configure(repo_root)
    commit = runs.git_commit(repo_root)
    head = "nogit" if commit == "unknown" else commit[:7]
    experiment = mlflow.get_experiment_by_name(
        os.environ.get("MLFLOW_EXPERIMENT_NAME", runs.DEFAULT_EXPERIMENT)
    )
    name = f"sweep {head} {grid}".strip()[: runs.MAX_RUN_NAME]
    tags = {**runs.run_tags(repo_root, {}), "sweep_grid": grid}
    run = mlflow.MlflowClient().create_run(experiment.experiment_id, tags=tags, run_name=name)
    return run.info.run_id


def close_sweep(repo_root: str | Path, run_id: str, exit_code: int) -> None:
    """End the parent run: FINISHED when every experiment ran, FAILED otherwise."""
    runs.configure(repo_root)
    status = "FINISHED" if exit_code == 0 else "FAILED"
    mlflow.MlflowClient().set_terminated(run_id, status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m captioning.tracking.sweeps", description=__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    opening = commands.add_parser("open", help="create the parent run and print its id")
    opening.add_argument("--grid", default="", help="the sweep's -S options, as its name")
    closing = commands.add_parser("close", help="end the parent run")
    closing.add_argument("run_id")
    closing.add_argument("--exit-code", type=int, default=0, help="the sweep's exit status")
    args = parser.parse_args(argv)
    repo = Path.cwd()
    if args.command == "open":
        print(open_sweep(repo, args.grid))
    else:
        close_sweep(repo, args.run_id, args.exit_code)


if __name__ == "__main__":
    main()
