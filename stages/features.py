"""Stage `features`: InceptionV3 feature maps of every image into float16 shards."""

import argparse
import json
from pathlib import Path

import pandas as pd

from captioning.atomic_files import atomic_write
from captioning.config import load_section
from captioning.features import build_extractor, extract_features, weights_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", required=True, help="captions parquet from `validate`")
    parser.add_argument("--out", required=True, help="feature store folder")
    args = parser.parse_args()
    params = load_section("features")
    # The table's images passed `validate` under this bound; extraction must accept them too.
    max_pixels = load_section("validate").max_pixels

    images = pd.read_parquet(args.table, columns=["image_id", "path", "split"]).drop_duplicates(
        "image_id"
    )
    extractor = build_extractor(params.weights, params.image_size, params.seed)
    index = extract_features(
        images,
        args.out,
        extractor,
        batch_size=params.batch_size,
        shard_size=params.shard_size,
        image_size=params.image_size,
        max_pixels=max_pixels,
    )
    # What the model must rebuild at inference time (see ModelConfig.extractor_*).
    spec = {
        "image_size": params.image_size,
        "extractor_weights": params.weights,
        "extractor_seed": params.seed,
        "extractor_digest": weights_digest(extractor),
    }
    atomic_write(Path(args.out) / "extractor.json", json.dumps(spec, indent=2) + "\n")
    print(f"features: {len(index)} images in {index['shard'].nunique()} shards")


if __name__ == "__main__":
    main()
