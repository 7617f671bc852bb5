"""InceptionV3 image features: the extractor, the shard files, the store and resumable extraction.

`build_extractor` (`extractor`) makes the InceptionV3 model whose last grid is
read as 64 locations of 2048 features; `extract_features` (`extraction`)
writes a sharded, resumable store of those features for a table of images;
`FeatureStore` (`store`) reads it back memory-mapped; `shards` holds the
sparse float16 file format underneath. Images are decoded and preprocessed by
`captioning.features.preprocessing`, not here. The names below are the package's
public API; the rest of the code imports them from `captioning.features`.
"""

from captioning.features.extraction import extract_features, write_extractor_spec
from captioning.features.extractor import (
    WeightsUnavailableError,
    build_extractor,
    imagenet_weights_path,
    weights_digest,
)
from captioning.features.shards import SHARD_SUFFIX, read_shard, write_shard
from captioning.features.store import INDEX_FILE, FeatureStore, bytes_per_image

__all__ = [
    "INDEX_FILE",
    "SHARD_SUFFIX",
    "FeatureStore",
    "WeightsUnavailableError",
    "build_extractor",
    "bytes_per_image",
    "extract_features",
    "imagenet_weights_path",
    "read_shard",
    "weights_digest",
    "write_extractor_spec",
    "write_shard",
]
