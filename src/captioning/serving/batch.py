"""Batch captioning on Apache Spark: a collection of images -> a Parquet table of captions.

`caption_collection` captions image files (Spark's `binaryFile` reader over a
folder or glob) or a Parquet table with an image-bytes column, with the
registered model loaded on the executors by `mlflow.pyfunc.spark_udf`: the
same pyfunc `mlflow models serve` serves, no second loading path. The model
URI is pinned to a version on the driver first (`models:/name@alias` ->
`models:/name/N`), so a promotion during the job cannot mix two models in one
output. Every image is first checked on the executors with the served model's
own request checks and the project's image reader; one that fails gets a row
with an empty caption and a short error instead of failing its Spark task
(the model sees a small valid stand-in image for it). Arrow batches are capped
at the batch size (at most the model's `max_batch`), so executor memory stays
flat. The work is cut into chunks, each written with one Spark append job:
Spark's commit protocol makes each chunk appear whole or not at all, so a
killed job keeps every finished chunk, and a rerun over the same output skips
inputs the same model version already has a row for (captioned or failed:
the same bytes through the same model fail the same way).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

# Inputs per Spark append job: each is committed whole, so a kill loses at most
# one chunk's work, while each chunk pays a few Spark jobs' overhead (seconds).
DEFAULT_CHUNK_SIZE = 5000
PATH_COLUMN = "path"  # binaryFile's column; the output's id column for file inputs
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_MAX_ERROR = 300  # characters of an error message kept in the output


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """What a `caption_collection` run did."""

    model_uri: str  # pinned: models:/name/N where the registry resolved an alias
    model_version: str
    captioned: int
    failed: int
    skipped: int  # already in the output for this model version

    def line(self) -> str:
        return (
            f"{self.captioned} captioned, {self.failed} failed, {self.skipped} skipped "
            f"(already done) with {self.model_uri}"
        )


def pin_model_uri(model_uri: str) -> tuple[str, str]:
    """(URI of one fixed model version, its version) for a models:/ alias, version or any URI."""
    alias = _ALIAS_URI.match(model_uri)
    if alias:
        from mlflow import MlflowClient

        version = MlflowClient().get_model_version_by_alias(alias["name"], alias["alias"])
        return f"models:/{alias['name']}/{version.version}", str(version.version)
    fixed = _VERSION_URI.match(model_uri)
    if fixed:
        return model_uri, fixed["version"]
    return model_uri, model_uri  # a run or a folder: the URI is its only name


def serving_config(model_uri: str) -> dict:
    """The pyfunc's `model_config` (decoding defaults, request bounds) from its MLmodel file."""
    from mlflow.models import Model
    from mlflow.models.model import MODEL_CONFIG
    from mlflow.pyfunc import FLAVOR_NAME

    config = Model.load(model_uri).flavors.get(FLAVOR_NAME, {}).get(MODEL_CONFIG)
    if not isinstance(config, dict) or "max_batch" not in config:
        raise ValueError(f"{model_uri} is not the captioner pyfunc: no model_config with max_batch")
    return config


# ----------------------------------------------------------------------------- executor side


def image_error(data: bytes | None, config: dict) -> str | None:
    """None when the served model will caption `data`, else a short reason (executor side).

    The served model's own request check (size, header, pixel bound) and then
    the full decode its reader does, so an image that passes cannot fail the
    model's batch.
    """
    from mlflow.exceptions import MlflowException

    from captioning.data.images import ImageReadError, decode_image
    from captioning.serving.request_checks import ServingConfig, decode_base64_image

    if data is None:  # Spark's file scan drops empty files; a Parquet cell may be null
        return "empty_file: no image bytes"
    serving = ServingConfig.from_dict(config)
    try:
        data = bytes(data)
        decode_base64_image(base64.b64encode(data).decode("ascii"), "image", serving)
        decode_image(data, serving.max_pixels, "image")
    except MlflowException as err:
        return err.message[:_MAX_ERROR]
    except ImageReadError as err:
        return f"{err.reason}: {err.detail}"[:_MAX_ERROR]
    except Exception as err:  # noqa: BLE001 - whatever breaks on one image is that row's error
        return f"{type(err).__name__}: {err}"[:_MAX_ERROR]
    return None


# ----------------------------------------------------------------------------- driver side


def _is_parquet(source: str) -> bool:
    path = Path(source)
    return source.endswith(".parquet") or (path.is_dir() and any(path.glob("*.parquet")))


def _read_inputs(spark, source: str, id_column: str, image_column: str):
    """(DataFrame of id + image bytes, the id column's name, every id) from files or a table."""
    if _is_parquet(source):
        table = spark.read.parquet(source)
        missing = {id_column, image_column} - set(table.columns)
        if missing:
            raise ValueError(f"{source}: no column(s) {sorted(missing)}; got {table.columns}")
        inputs = table.select(id_column, table[image_column].alias("content"))
        return inputs, id_column, {row[0] for row in inputs.select(id_column).collect()}
    files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(source)
    # The listing, not the scan: Spark's file scan skips empty files, which must get rows too.
    # Hadoop writes local paths file:/x, the listing's URIs file:///x.
    every = {re.sub(r"^file:///", "file:/", name) for name in files.inputFiles()}
    return files.select(PATH_COLUMN, "content"), PATH_COLUMN, every


def _done_ids(spark, output: str, id_column: str, model_uri: str) -> set:
    """Ids the output already has a row for, made by this model version."""
    if not Path(output).exists() and "://" not in output:
        return set()
    try:
        previous = spark.read.parquet(output)
    except Exception as err:  # noqa: BLE001 - no committed part yet (a first job killed early)
        log.info("no finished output in %s yet (%s)", output, type(err).__name__)
        return set()
    rows = previous.where(previous["model_uri"] == model_uri).select(id_column).distinct()
    return {row[0] for row in rows.collect()}


def _chunk_table(inputs, id_column: str, ids: list, config: dict, model, parallelism: int):
    """The output rows of one chunk: id, caption, score, error (model columns added later)."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from captioning.serving.pyfunc import IMAGE_COLUMN, example_image_bytes

    @pandas_udf("string")
    def check(content: pd.Series) -> pd.Series:
        return content.map(lambda data: image_error(data, config))

    stand_in = base64.b64encode(example_image_bytes()).decode("ascii")
    spark = inputs.sparkSession
    scanned = inputs.where(F.col(id_column).isin(ids))  # pushed into the file scan
    wanted = spark.createDataFrame([(i,) for i in ids], inputs.select(id_column).schema)
    unread = wanted.join(scanned.select(id_column), id_column, "left_anti").withColumn(
        "content", F.lit(None).cast("binary")
    )  # empty files: no row in the scan
    rows = scanned.unionByName(unread).coalesce(parallelism)
    rows = rows.withColumn("error", check("content"))
    image = F.when(F.col("error").isNull(), F.base64("content")).otherwise(F.lit(stand_in))
    rows = rows.withColumn("prediction", model(F.struct(image.alias(IMAGE_COLUMN))))
    ok = F.col("error").isNull()
    return rows.select(
        id_column,
        F.when(ok, F.col("prediction.caption")).otherwise(F.lit("")).alias("caption"),
        F.when(ok, F.col("prediction.score")).alias("score"),
        "error",
    )


def caption_collection(
    spark,
    source: str,
    output: str,
    model_uri: str,
    *,
    batch_size: int | None = None,
    params: dict | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    id_column: str = PATH_COLUMN,
    image_column: str = "image",
) -> BatchSummary:
    """Caption every input of `source` not yet in `output` for this model version; append rows.

    `params` are the pyfunc's request params (decoder, beam_size, max_length,
    length_penalty, temperature); left out, the registered model's defaults
    apply. `batch_size` (images per model call, the Arrow batch) defaults to
    and is capped at the model's `max_batch`. `id_column`/`image_column` name
    a Parquet input's columns; file inputs are named by their path.
    """
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pinned, version = pin_model_uri(model_uri)
    config = serving_config(pinned)
    max_batch = int(config.get("max_batch", 1))
    if batch_size is None or batch_size > max_batch:
        if batch_size is not None:
            log.warning("batch size %d > the model's max_batch %d: using %d", batch_size,
                        max_batch, max_batch)  # fmt: skip
        batch_size = max_batch
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Each model call gets one Arrow batch: at most this many images in memory per worker.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))

    inputs, id_name, every = _read_inputs(spark, source, id_column, image_column)
    done = _done_ids(spark, output, id_name, pinned)
    todo = sorted(every - done)
    log.info("batch: %d to caption, %d already done with %s", len(todo), len(every & done), pinned)
    if not todo:  # spark_udf would download the model for nothing
        return BatchSummary(pinned, version, 0, 0, len(every & done))
    model = mlflow.pyfunc.spark_udf(
        spark,
        pinned,
        result_type="caption string, score double",
        env_manager="local",
        params=params or None,
    )
    parallelism = spark.sparkContext.defaultParallelism
    outcomes = {True: 0, False: 0}  # error is null: captioned
    for start in range(0, len(todo), chunk_size):
        ids = todo[start : start + chunk_size]
        tasks = max(1, min(parallelism, len(ids)))
        table = (
            _chunk_table(inputs, id_name, ids, config, model, tasks)
            .withColumn("model_uri", F.lit(pinned))
            .withColumn("model_version", F.lit(version))
            .persist()  # the counts below read what was written, without captioning twice
        )
        table.write.mode("append").parquet(output)  # one commit: the chunk whole or not at all
        for row in table.groupBy(F.col("error").isNull().alias("ok")).count().collect():
            outcomes[row["ok"]] += row["count"]
        table.unpersist()
    return BatchSummary(pinned, version, outcomes[True], outcomes[False], len(every & done))
