"""Stage `register`: log the served model to the training run, register it, pick the champion."""

import argparse
import dataclasses
import json
from pathlib import Path

import mlflow
import pandas as pd

from captioning.atomic_files import atomic_write
from captioning.config import GatesParams, check_params, from_dict, load_section, read_params
from captioning.errors import run_stage
from captioning.serving import registry
from captioning.serving.pyfunc import ServingConfig, log_captioner_model
from captioning.serving.savedmodel import export_savedmodel
from captioning.tracking import runs as tracking

SAVEDMODEL_ARTIFACT = "savedmodel"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="trained .keras captioner")
    parser.add_argument("--metrics", required=True, help="evaluate's metrics JSON")
    parser.add_argument("--predictions", required=True, help="evaluate's COCO results JSON")
    parser.add_argument("--table", required=True, help="caption table (the references)")
    parser.add_argument("--run", required=True, help="JSON naming the training MLflow run")
    parser.add_argument("--out", required=True, help="registration JSON to write")
    parser.add_argument("--savedmodel", required=True, help="TF SavedModel folder to write")
    args = parser.parse_args()
    params = load_section("register")
    evaluate = load_section("evaluate")

    metrics = json.loads(Path(args.metrics).read_text())
    image_ids = [p["image_id"] for p in json.loads(Path(args.predictions).read_text())]
    if metrics.get("num_images") != len(image_ids):
        raise SystemExit(f"{args.metrics} and {args.predictions} disagree on the image count")
    eval_set = registry.evaluation_set_digest(
        pd.read_parquet(args.table), evaluate.split, image_ids
    )
    serving = ServingConfig.from_params(evaluate, params)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    # Never champion below the gates' floors or with params the check rejects.
    raw = read_params()
    gates = from_dict(GatesParams, "gates", raw.get("gates"))
    blocked = registry.blocking_reason(check_params(raw, require_all=False), metrics, gates)
    export_savedmodel(args.model, args.savedmodel, serving.max_length, serving.max_pixels)

    tracking.configure(Path.cwd())
    run_id = tracking.resume_run(args.run)
    if run_id is None:
        raise SystemExit(f"the run named in {args.run} is not in {mlflow.get_tracking_uri()}")
    with mlflow.start_run(run_id=run_id):

        def log_model() -> tuple[str, str]:
            info = log_captioner_model(args.model, serving, tags={"eval_set_digest": eval_set})
            mlflow.log_artifacts(args.savedmodel, SAVEDMODEL_ARTIFACT)  # for TF Serving
            mlflow.log_metrics(
                {f"{evaluate.split}.{k}": float(v) for k, v in numbers.items()},
                model_id=info.model_id,
            )
            return info.model_uri, info.model_id

        result = registry.register_captioner(
            mlflow.MlflowClient(),
            params.model_name,
            run_id,
            numbers,
            eval_set,
            registry.model_key(args.model, dataclasses.asdict(serving)),
            log_model,
            blocked=blocked,
        )
        mlflow.MlflowClient().set_model_version_tag(
            result.name, result.version, "savedmodel", f"runs:/{run_id}/{SAVEDMODEL_ARTIFACT}"
        )
        mlflow.set_tags(
            {
                "registered_model": result.name,
                "registered_version": result.version,
                "registered_alias": result.alias,
            }
        )
    atomic_write(args.out, result.to_json())
    print(f"register: {result.name} version {result.version} -> {result.alias}: {result.reason}")


if __name__ == "__main__":
    run_stage(main)
