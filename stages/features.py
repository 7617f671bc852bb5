"""Stage `features`: InceptionV3 feature maps of every image into float16 shards.

`features.engine` picks where extraction runs: `local` (this process) or
`spark` (executors of `features.spark_master`, or of the `spark-submit` that
started this; docs/spark.md); both write the same store byte for byte.
`--part K/N` (local engine) extracts only part K of N of the store (every
N-th shard); the stage run whole keeps the parts' shards and merges them.
"""

import argparse

import pandas as pd

from captioning.config import load_section
from captioning.errors import run_stage
from captioning.features import build_extractor, extract_features, write_extractor_spec


def _part(text: str) -> tuple[int, int]:
    try:
        part, parts = (int(n) for n in text.split("/"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 0/4; got {text!r}") from err
    if parts < 1 or not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"K/N needs 0 <= K < N; got {text!r}")
    return part, parts


def _extract_on_spark(images: pd.DataFrame, out: str, params, max_pixels: int) -> pd.DataFrame:
    from captioning.features.spark import extract_features_spark
    from captioning.spark_session import spark_session

    spark = spark_session(params.spark_master, "captioning features")
    return extract_features_spark(
        spark,
        images,
        out,
        weights=params.weights,
        image_size=params.image_size,
        seed=params.seed,
        batch_size=params.batch_size,
        shard_size=params.shard_size,
        max_pixels=max_pixels,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="captions parquet from `validate`")
    parser.add_argument("--out", required=True, help="feature store folder")
    parser.add_argument(
        "--part", type=_part, default=(0, 1), metavar="K/N",
        help="extract only part K of N (0-based) and no index; a run without --part merges",
    )  # fmt: skip
    args = parser.parse_args()
    params = load_section("features")
    # The table's images passed `validate` under this bound; extraction must accept them too.
    max_pixels = load_section("validate").max_pixels
    part, parts = args.part

    images = pd.read_parquet(args.table, columns=["image_id", "path", "split"]).drop_duplicates(
        "image_id"
    )
    if params.engine == "spark":
        if parts > 1:
            parser.error("--part is for the local engine; Spark spreads the shards itself")
        index = _extract_on_spark(images, args.out, params, max_pixels)
        print(f"features (spark): {len(index)} images in {index['shard'].nunique()} shards")
        extractor = build_extractor(params.weights, params.image_size, params.seed)
        write_extractor_spec(args.out, extractor, params.weights, params.image_size, params.seed)
        return
    extractor = build_extractor(params.weights, params.image_size, params.seed)
    index = extract_features(
        images,
        args.out,
        extractor,
        batch_size=params.batch_size,
        shard_size=params.shard_size,
        image_size=params.image_size,
        max_pixels=max_pixels,
        part=part,
        parts=parts,
    )
    if parts > 1:
        print(
            f"features part {part}/{parts}: {len(index)} images in {index['shard'].nunique()} "
            "shards; once every part is done, run the stage whole to merge them"
        )
        return
    write_extractor_spec(args.out, extractor, params.weights, params.image_size, params.seed)
    print(f"features: {len(index)} images in {index['shard'].nunique()} shards")


if __name__ == "__main__":
    run_stage(main)
