"""Feature extraction benchmarks: extraction speed against the bare forward pass, and store size.

`bench_features` times `extract_features` end to end (demo JPEGs on disk ->
float16 store) against InceptionV3's forward pass alone on an in-memory batch;
the ratio says how much of the extractor's speed the pipeline around it keeps,
and the FLOPs of InceptionV3's layers at that rate say how much of the
machine's peak it reaches.
`bench_store` measures the bytes on disk per image of that store, index and
manifest included, against float32 features.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from benchmarks.flops import add_utilisation, layer_flops
from benchmarks.harness import Result, seconds
from benchmarks.workspace import (
    CHANNELS,
    EXTRACTOR_WEIGHTS,
    FEATURE_BATCH,
    IMAGE_SIZE,
    LOCATIONS,
    Workspace,
    extract,
)
from captioning.features import SHARD_SUFFIX, FeatureStore, bytes_per_image

FLOAT32_BYTES = LOCATIONS * CHANNELS * 4  # one image's features as float32: 524,288


def _bare_forward(extractor) -> tuple[Callable, tf.Tensor]:
    """The extractor's traced forward pass and one random batch for it, both warmed up."""
    spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)
    bare = tf.function(lambda x: extractor(x, training=False), input_signature=[spec])
    batch = tf.random.stateless_uniform((FEATURE_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), [0, 0], -1, 1)
    bare(batch).numpy()
    return bare, batch


def bench_features(ws: Workspace) -> Result:
    n = ws.sizes.feature_images
    result = Result(
        f"features: extract_features on {n} demo JPEGs vs bare InceptionV3 "
        f"(batch {FEATURE_BATCH}, {IMAGE_SIZE} px, weights {EXTRACTOR_WEIGHTS})"
    )
    images = ws.images(n)
    extractor = ws.extractor()
    # Warm-ups: extract_features traces its forward pass once per model; one full
    # batch also gets the batch-size kernels set up.
    extract(images.iloc[:FEATURE_BATCH], ws.root / "warmup-store", extractor)
    bare, batch = _bare_forward(extractor)

    def bare_batches(count: int) -> float:
        return seconds(lambda: [bare(batch).numpy() for _ in range(count)])

    # The bare pass is timed half before and half after the end-to-end run, so
    # a change in the machine's load over the run hits both about equally.
    batches = -(-n // FEATURE_BATCH)
    before, after = max(1, batches // 2), max(1, batches - batches // 2)
    bare_s = bare_batches(before)
    ws.store_dir = ws.root / "store"
    e2e_s = seconds(lambda: extract(images, ws.store_dir, extractor))
    bare_s += bare_batches(after)
    peak = ws.peak_gflops()

    e2e_rate = n / e2e_s
    bare_rate = (before + after) * FEATURE_BATCH / bare_s
    ratio = e2e_rate / bare_rate
    result.add("end-to-end extract_features", e2e_rate, "images/s")
    result.add("bare forward pass (tf.function)", bare_rate, "images/s")
    result.add("end-to-end / bare", ratio, "")
    result.check("end-to-end / bare", ">= 0.85", ratio >= 0.85)
    rates = {"end to end": e2e_rate, "bare forward": bare_rate}
    flops = layer_flops(extractor)
    add_utilisation(result, peak, ws.sizes.peak_matmul, flops, rates, "image (InceptionV3 forward)")
    result.notes.append(
        "end to end = hashing the files, decoding and resizing the JPEGs (tf.data), "
        "the forward pass, float16 conversion and writing shards + index"
    )
    return result


def bench_store(ws: Workspace) -> Result:
    if ws.store_dir is None:  # --only store: write one, untimed
        ws.store_dir = ws.root / "store"
        extract(ws.images(ws.sizes.feature_images), ws.store_dir, ws.extractor())
    count = len(FeatureStore(ws.store_dir))
    per_image = bytes_per_image(ws.store_dir)
    shards = sum(p.stat().st_size for p in ws.store_dir.glob(f"*{SHARD_SUFFIX}"))
    result = Result(f"store: bytes on disk per image ({count} images, one store)")
    result.add("bytes per image (all files)", per_image, "bytes")
    result.add("  of which shards", shards / count, "bytes")
    result.add("  of which index + manifest", per_image - shards / count, "bytes")
    result.add(f"share of float32 ({FLOAT32_BYTES:,} bytes)", 100 * per_image / FLOAT32_BYTES, "%")
    result.check(
        "bytes per image (all files)", f"<= {FLOAT32_BYTES // 2:,}", per_image <= FLOAT32_BYTES / 2
    )
    result.notes.append(
        "shards keep float16 values losslessly: a bitmask of the nonzero values plus those "
        "values (InceptionV3's last block ends in ReLUs, about half of all values are zero)"
    )
    return result
