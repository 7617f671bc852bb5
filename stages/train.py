"""Stage `train`: fit the captioner on cached features, logging to DVCLive and a new MLflow run.

The MLflow run records system metrics (CPU, memory, disk, network, GPU where
there is one) while it trains, and nests under the sweep's run when `make
sweep` started it.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from captioning.config import load_section, read_params
from captioning.data.sources import source_scorer
from captioning.data.text import Vocabulary
from captioning.errors import run_stage
from captioning.evaluation.evaluate import references_by_image
from captioning.features import FeatureStore
from captioning.tracking import runs as tracking
from captioning.tracking.sweeps import parent_run_id
from captioning.training.batches import CaptionSet
from captioning.training.budget import StoppingRule, still_improving_warning
from captioning.training.callbacks import LiveMetrics
from captioning.training.checkpoints import read_history, save_model, settings_fingerprint
from captioning.training.distributed import is_chief, train_distributed, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--table", required=True, help="caption table (val references)")
    parser.add_argument(
        "--raw", required=True, help="download output (finds the source's own scorer)"
    )
    parser.add_argument("--model", required=True, help="output .keras file")
    parser.add_argument("--checkpoints", required=True, help="per-epoch state, kept for resuming")
    parser.add_argument("--history", required=True, help="per-epoch metrics CSV")
    parser.add_argument("--live", required=True, help="DVCLive folder (metrics.json, plots/)")
    parser.add_argument("--run", required=True, help="output JSON naming the MLflow run")
    args = parser.parse_args()
    if not is_chief(load_section("train").distribute):
        print(f"train (worker): {train_as_worker(args)}")
        return

    uri = tracking.configure(Path.cwd())
    with tracking.server_errors(uri):
        run, summary, warning = train_in_run(args)
    shutil.copyfile(Path(args.checkpoints) / "mlflow_run.json", args.run)
    print(f"train: {summary} (MLflow run {run.info.run_id}, {run.info.run_name!r})")
    print(f"train: {tracking.experiment_url(uri, run.info.experiment_id, run.info.run_id)}")
    if warning:
        print(f"train: WARNING: {warning}", file=sys.stderr)


def train_in_run(args: argparse.Namespace) -> tuple[mlflow.ActiveRun, dict, str | None]:
    """Fit inside an MLflow run: a killed run is continued, a finished one never reopened.

    Returns the run, the training summary and the still-improving warning
    (None when the run converged or stopped early), which is also the run's
    `convergence_warning` tag.
    """
    repo = Path.cwd()
    tokens, checkpoints = Path(args.tokens), Path(args.checkpoints)
    store = FeatureStore(args.features)
    vocabulary = Vocabulary.from_json((tokens / "vocab.json").read_text())
    train, val = CaptionSet.load(tokens, "train"), CaptionSet.load(tokens, "val")
    val_references = references_by_image(pd.read_parquet(args.table), "val")

    all_params = read_params()
    key = settings_fingerprint(tracking.flatten(all_params))
    previous = tracking.resume_run(checkpoints / "mlflow_run.json", unfinished_only=True, key=key)
    name = None if previous else tracking.run_name(repo, all_params)
    parent = None if previous else parent_run_id()
    with mlflow.start_run(
        run_id=previous, run_name=name, parent_run_id=parent, log_system_metrics=True
    ) as run:
        tracking.save_run_ref(checkpoints / "mlflow_run.json", run, key)
        mlflow.log_params(tracking.flatten(all_params))
        hashes = tracking.dvc_output_hashes(
            repo / "dvc.lock", [args.table, args.features, args.tokens]
        )
        mlflow.set_tags(tracking.run_tags(repo, hashes))
        for split in ("train", "val"):  # a resumed run's are already there: MLflow keeps one
            tracking.log_split(args.table, split, source=args.table)
        extractor = json.loads((Path(args.features) / "extractor.json").read_text())
        params = load_section("train")
        model, summary = trainer(params)(
            store,
            vocabulary,
            train,
            val,
            params,
            extractor,
            checkpoints,
            args.history,
            callbacks=[LiveMetrics(args.live), tracking.EpochLogger()],
            val_references=val_references,
            val_scorer=source_scorer(args.raw),
        )
        save_model(model, args.model)
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        warning = still_improving_warning(StoppingRule.of(params), read_history(args.history))
        mlflow.set_tag("convergence", "still improving" if warning else "converged")
        if warning:
            mlflow.set_tag("convergence_warning", warning)
        mlflow.log_artifact(str(tokens / "vocab.json"))
        mlflow.log_artifact(args.history)
    return run, summary, warning


def train_as_worker(args: argparse.Namespace) -> dict:
    """A multi_worker worker other than the chief: trains in step with it, writes no output.

    No MLflow run, nothing dvc.yaml declares: its state stays in a temporary folder.
    """
    tokens = Path(args.tokens)
    with tempfile.TemporaryDirectory(prefix="train-worker-") as scratch:
        _, summary = train_distributed(
            FeatureStore(args.features),
            Vocabulary.from_json((tokens / "vocab.json").read_text()),
            CaptionSet.load(tokens, "train"),
            CaptionSet.load(tokens, "val"),
            load_section("train"),
            json.loads((Path(args.features) / "extractor.json").read_text()),
            Path(scratch) / "checkpoints",
            Path(scratch) / "history.csv",
            val_references=references_by_image(pd.read_parquet(args.table), "val"),
            val_scorer=source_scorer(args.raw),
        )
    return summary


if __name__ == "__main__":
    run_stage(main)
