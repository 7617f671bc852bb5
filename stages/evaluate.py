"""Stage `evaluate`: caption the evaluation split, score it, log to the training run."""

import argparse
import json
from pathlib import Path

import mlflow
import pandas as pd

from captioning.atomic_files import atomic_path, atomic_write
from captioning.config import load_section
from captioning.data.sources import source_scorer
from captioning.errors import run_stage
from captioning.evaluation.evaluate import evaluate_split, scores_by_length
from captioning.features import FeatureStore
from captioning.model.captioner import load_captioner
from captioning.tracking import runs as tracking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--features", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument(
        "--raw", required=True, help="download output (finds the source's own scorer)"
    )
    parser.add_argument("--run", required=True, help="JSON naming the training MLflow run")
    parser.add_argument("--predictions", required=True, help="COCO results JSON to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--per-image", required=True, help="per-image scores CSV to write")
    parser.add_argument("--by-length", required=True, help="scores by caption length CSV to write")
    args = parser.parse_args()
    params = load_section("evaluate")

    result = evaluate_split(
        load_captioner(args.model),
        FeatureStore(args.features),
        pd.read_parquet(args.table),
        params,
        source_scorer(args.raw),
    )
    atomic_write(args.predictions, json.dumps(result.predictions, indent=1) + "\n")
    with atomic_path(args.per_image, ".csv") as tmp:
        result.per_image.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(args.by_length, ".csv") as tmp:
        scores_by_length(result.per_image).to_csv(tmp, index=False, float_format="%.6f")
    report = {**result.corpus, "skipped": result.skipped, "decoder": params.decoder}
    atomic_write(args.metrics, json.dumps(report, indent=2, sort_keys=True) + "\n")

    tracking.configure(Path.cwd())
    with mlflow.start_run(run_id=tracking.resume_run(args.run)):
        mlflow.log_metrics({f"{params.split}.{k}": float(v) for k, v in result.corpus.items()})
        tracking.log_split(args.table, params.split, source=args.table)  # context: the split
        for path in (args.metrics, args.per_image, args.predictions, args.by_length):
            mlflow.log_artifact(path)
    print(json.dumps(result.corpus, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_stage(main)
