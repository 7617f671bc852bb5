"""Spark benchmark: batch captioning and feature extraction on local[2] against one process.

`spark_figures` captions the same image files with `captioning caption`'s
library path (one process, `ImageCaptioner.caption_files`) and with
`captioning batch` on Spark (`caption_collection`, the registered model via
spark_udf), and extracts the same images' features with both engines, in one
run on the same cores; it returns images/s for each and the Spark/local
ratios (the issue's goal: batch >= 0.8 of `captioning caption` on one
machine). Model loading is counted in both, since a job pays it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd


def _rate(count: int, start: float) -> float:
    return count / (time.perf_counter() - start)


def spark_figures(
    files: list[Path],
    keras_path: Path,
    model_uri: str,
    table: pd.DataFrame,
    *,
    master: str = "local[2]",
    image_size: int = 299,
    batch_size: int = 16,
) -> dict[str, float]:
    """images/s: caption (one process) vs batch (Spark), extraction local vs spark, and ratios.

    `files` are image files to caption with `keras_path` (registered as
    `model_uri`); `table` (image_id, path, split) the images to extract.
    """
    from captioning.features import build_extractor, extract_features
    from captioning.features.spark import extract_features_spark
    from captioning.serving.batch import caption_collection
    from captioning.serving.inference import ImageCaptioner
    from captioning.spark_session import spark_session

    spark = spark_session(master, "captioning bench")
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ImageCaptioner(keras_path).caption_files(files, batch_size=batch_size)
        figures["caption_img_s"] = _rate(len(files), start)

        folder = Path(tmp) / "images"
        folder.mkdir()
        for n, path in enumerate(files):
            (folder / f"{n:06d}{path.suffix}").symlink_to(Path(path).resolve())
        start = time.perf_counter()
        caption_collection(
            spark, str(folder), str(Path(tmp) / "out.parquet"), model_uri, batch_size=batch_size
        )
        figures["batch_img_s"] = _rate(len(files), start)

        store = {"image_size": image_size, "batch_size": batch_size, "shard_size": 64}
        start = time.perf_counter()
        extract_features(
            table, Path(tmp) / "local", build_extractor("none", image_size, 0), progress=False,
            **store,
        )  # fmt: skip
        figures["extract_local_img_s"] = _rate(len(table), start)
        start = time.perf_counter()
        extract_features_spark(spark, table, Path(tmp) / "spark", weights="none", seed=0, **store)
        figures["extract_spark_img_s"] = _rate(len(table), start)
    figures["batch_over_caption"] = figures["batch_img_s"] / figures["caption_img_s"]
    figures["extract_spark_over_local"] = (
        figures["extract_spark_img_s"] / figures["extract_local_img_s"]
    )
    return figures
