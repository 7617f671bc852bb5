"""Stage `report`: attention overlays and an HTML page of examples, logged to the training run."""

import argparse
import json
import sys
from pathlib import Path

import mlflow
import pandas as pd

from captioning.config import load_section
from captioning.errors import run_stage
from captioning.evaluation.report import build_report
from captioning.features import FeatureStore
from captioning.model.captioner import load_captioner
from captioning.tracking import runs as tracking
from captioning.training.budget import StoppingRule, still_improving_warning
from captioning.training.checkpoints import read_history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--features", required=True)
    parser.add_argument("--table", required=True, help="captions parquet from `validate`")
    parser.add_argument("--predictions", required=True, help="evaluate's COCO results JSON")
    parser.add_argument("--per-image", required=True, help="evaluate's per-image scores CSV")
    parser.add_argument("--run", required=True, help="JSON naming the training MLflow run")
    parser.add_argument("--history", required=True, help="train's per-epoch history CSV")
    parser.add_argument("--out", required=True, help="folder for index.html, overlays/, images/")
    args = parser.parse_args()
    report_params = load_section("report")
    evaluate_params = load_section("evaluate")
    warning = still_improving_warning(
        StoppingRule.of(load_section("train")), read_history(args.history)
    )
    if warning:
        print(f"report: WARNING training {warning}", file=sys.stderr)

    summary = build_report(
        load_captioner(args.model),
        FeatureStore(args.features),
        pd.read_parquet(args.table),
        pd.read_csv(args.per_image),
        report_params,
        evaluate_params,
        args.out,
        training_warning=warning,
    )
    # The page must show the captions that were scored; say so loudly if it does not.
    predicted = {
        p["image_id"]: p["caption"] for p in json.loads(Path(args.predictions).read_text())
    }
    differ = sorted(
        set(summary["caption_mismatches"])
        | {i for i, c in summary["captions"].items() if predicted.get(i, c) != c}
    )
    if differ:
        print(
            f"report: WARNING {len(differ)} caption(s) differ from evaluate's "
            f"(were params changed since evaluate ran?): {differ[:10]}",
            file=sys.stderr,
        )

    tracking.configure(Path.cwd())
    with mlflow.start_run(run_id=tracking.resume_run(args.run)):
        mlflow.log_artifacts(args.out, "attention")
    print(f"report: {summary['overlays']} overlays, page at {summary['index']}")


if __name__ == "__main__":
    run_stage(main)
