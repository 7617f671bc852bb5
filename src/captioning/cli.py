"""The `captioning` command: caption images, score a results file, gate a run's metrics.

captioning caption IMG [IMG ...] [--model models/captioner.keras] [--decoder beam]
captioning batch INPUT --output OUT [--model models:/image-captioner@champion] [--master local[*]]
captioning score RESULTS.json --annotations captions_val2014.json
captioning gate [--base-ref main | --base-metrics BASE.json] [--out gate.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import typing

from captioning.config import DecoderMethod, EvaluateParams, FeaturesParams, RegisterParams


def _caption(args: argparse.Namespace) -> int:
    from captioning.data.images import ImageReadError
    from captioning.serving.inference import ImageCaptioner

    captioner = ImageCaptioner(args.model)
    try:
        result = captioner.caption_files(
            args.images,
            method=args.decoder,
            beam_size=args.beam_size,
            length_penalty=args.length_penalty,
            max_len=args.max_len,
            batch_size=args.batch_size,
        )
    except ImageReadError as err:
        print(f"captioning caption: {err}", file=sys.stderr)
        return 2
    for path, caption, score in zip(args.images, result.captions, result.scores, strict=True):
        if args.json:
            print(json.dumps({"image": path, "caption": caption, "score": float(score)}))
        else:
            print(f"{path}\t{caption}")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from captioning.serving.batch import caption_collection
    from captioning.spark_session import spark_session

    params = {
        key: value
        for key, value in (
            ("decoder", args.decoder),
            ("beam_size", args.beam_size),
            ("max_length", args.max_len),
        )
        if value is not None
    }
    spark = spark_session(args.master, "captioning batch")
    summary = caption_collection(
        spark,
        args.input,
        args.output,
        args.model,
        batch_size=args.batch_size,
        params=params,
        chunk_size=args.chunk_size,
        id_column=args.id_column,
        image_column=args.image_column,
    )
    print(f"captioning batch: {summary.line()} -> {args.output}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from captioning.evaluation import metrics

    result = metrics.score_files(args.results, args.annotations)
    if args.json:
        print(json.dumps({"metrics": result.corpus, "skipped": result.skipped}, indent=2))
    else:
        print(metrics.format_table(result.corpus))
        for name, reason in result.skipped.items():
            print(f"{name}: skipped ({reason})")
    return 0


def _gate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from captioning.config import ConfigError, load_section
    from captioning.evaluation import gate

    try:
        result = gate.run_gate(
            args.metrics,
            load_section("gates", args.params),
            base_ref=args.base_ref,
            base_metrics_path=args.base_metrics,
        )
    except (gate.GateError, ConfigError, OSError) as err:
        print(f"captioning gate: {err}", file=sys.stderr)
        return 2
    table = gate.markdown_table(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"captioning {gate.summary(result)}", file=sys.stderr)
    return result.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioning", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("caption", help="print a caption for each image file")
    # Decoding defaults are the evaluate stage's (EvaluateParams), so the command
    # captions an image the way the pipeline scores the test split.
    cap.add_argument("images", nargs="+", help="image files")
    cap.add_argument("--model", default="models/captioner.keras", help="trained .keras model")
    cap.add_argument(
        "--decoder", choices=typing.get_args(DecoderMethod), default=EvaluateParams.decoder
    )
    cap.add_argument("--beam-size", type=int, default=EvaluateParams.beam_size)
    cap.add_argument(
        "--length-penalty",
        type=float,
        default=EvaluateParams.length_penalty,
        help="beam: rank by log-prob / words**this (default: evaluate.length_penalty's default)",
    )
    cap.add_argument(
        "--max-len",
        type=int,
        default=EvaluateParams.max_len,
        help="most tokens per caption (default: evaluate.max_len's default, as the evaluate stage)",
    )
    cap.add_argument(
        "--batch-size",
        type=int,
        default=FeaturesParams.batch_size,
        help="images per forward pass (default: features.batch_size's default)",
    )
    cap.add_argument("--json", action="store_true", help="one JSON object per line")
    cap.set_defaults(func=_caption)

    _add_batch_parser(sub)

    score = sub.add_parser("score", help="score a COCO results file with coco-caption metrics")
    score.add_argument("results", help="COCO results JSON: [{image_id, caption}]")
    score.add_argument("--annotations", required=True, help="COCO captions annotation JSON")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.set_defaults(func=_score)

    gate = sub.add_parser(
        "gate",
        help="check metrics against the floors in params.yaml and a base run; exit 1 on a failure",
        description="Print a Markdown table (metric, base, PR, change, verdict) and exit 1 when a "
        "metric is below its floor, drops more than its tolerance below the base, or is missing; "
        "exit 2 when the gate cannot run. See docs/ci.md.",
    )
    gate.add_argument("--metrics", default="reports/metrics.json", help="the run's metrics JSON")
    gate.add_argument("--params", default="params.yaml", help="params file with a `gates:` section")
    base = gate.add_mutually_exclusive_group()
    base.add_argument(
        "--base-ref", help="git revision to compare with (`dvc metrics diff REF`), e.g. main"
    )
    base.add_argument("--base-metrics", help="the base run's metrics JSON file")
    gate.add_argument("--out", help="also write the Markdown table to this file")
    gate.set_defaults(func=_gate)
    return parser


def _add_batch_parser(sub) -> None:
    from captioning.serving.batch import DEFAULT_CHUNK_SIZE

    batch = sub.add_parser(
        "batch",
        help="caption a collection on Spark with the registered model (docs/spark.md)",
        description="Caption image files (a folder or glob) or a Parquet table of image bytes "
        "with a registered model on Spark; append one row per input (id, caption, score, error, "
        "model_uri, model_version) to a Parquet dataset, skipping inputs it already has for the "
        "same model version. Bad images give error rows, never a failed job.",
    )
    batch.add_argument("input", help="folder or glob of image files, or a Parquet table")
    batch.add_argument("--output", required=True, help="Parquet dataset the rows are appended to")
    batch.add_argument(
        "--model",
        default=f"models:/{RegisterParams.model_name}@champion",
        help="MLflow model URI; an alias is pinned to its version when the job starts",
    )
    batch.add_argument(
        "--master",
        default=FeaturesParams.spark_master,
        help="Spark master when not run by spark-submit (default: every core of this machine)",
    )
    batch.add_argument(
        "--decoder",
        choices=typing.get_args(DecoderMethod),
        help="default: the registered model's (what it was evaluated with)",
    )
    batch.add_argument("--beam-size", type=int, help="default: the registered model's")
    batch.add_argument("--max-len", type=int, help="most tokens per caption; default: the model's")
    batch.add_argument(
        "--batch-size", type=int, help="images per model call (Arrow batch); default and cap: "
        "the model's max_batch",
    )  # fmt: skip
    batch.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
        help="inputs per committed Spark job (a kill loses at most one chunk)",
    )  # fmt: skip
    batch.add_argument("--id-column", default="path", help="Parquet input: the id column")
    batch.add_argument("--image-column", default="image", help="Parquet input: the bytes column")
    batch.set_defaults(func=_batch)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
