"""Feature extraction: `extract_features` end to end against the bare forward pass, and store size.

`bench_features` times demo JPEGs on disk -> float16 store against InceptionV3's
forward pass alone on an in-memory batch: the ratio says how much of the
extractor's speed the pipeline around it keeps, and the FLOPs at that rate
how much of the machine's peak it reaches. `bench_store` measures the bytes on
disk per image of that store, index and manifest included, against float32.
"""

from __future__ import annotations

import math

import tensorflow as tf

from benchmarks.flops import add_utilisation, layer_flops
from benchmarks.harness import Result, seconds
from benchmarks.workspace import EXTRACTOR_WEIGHTS, Workspace
from captioning.features import SHARD_SUFFIX, FeatureStore, bytes_per_image


def bench_features(ws: Workspace) -> Result:
    n, size, batch = ws.sizes.feature_images, ws.sizes.image_size, ws.sizes.feature_batch
    result = Result(
        f"features: extract_features on {n} demo JPEGs vs bare InceptionV3 "
        f"(batch {batch}, {size} px, weights {EXTRACTOR_WEIGHTS})"
    )
    images, extractor = ws.images(n), ws.extractor()
    ws.extract(images.iloc[:batch], ws.root / "warmup-store")  # traces its forward pass
    spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    bare = tf.function(lambda x: extractor(x, training=False), input_signature=[spec])
    inputs = tf.random.stateless_uniform((batch, size, size, 3), [0, 0], -1, 1)
    bare(inputs).numpy()

    def bare_batches(count: int) -> float:
        return seconds(lambda: [bare(inputs).numpy() for _ in range(count)])

    # Half the bare batches before the end-to-end run and half after, so a change
    # in the machine's load hits both about equally.
    batches = -(-n // batch)
    before, after = max(1, batches // 2), max(1, batches - batches // 2)
    bare_s = bare_batches(before)
    ws.store_dir = ws.root / "store"
    e2e_s = seconds(lambda: ws.extract(images, ws.store_dir))
    bare_s += bare_batches(after)
    e2e_rate, bare_rate = n / e2e_s, (before + after) * batch / bare_s
    result.add("end-to-end extract_features", e2e_rate, "images/s")
    result.add("bare forward pass (tf.function)", bare_rate, "images/s")
    result.add("end-to-end / bare", e2e_rate / bare_rate, "")
    result.check("end-to-end / bare", ">= 0.85", e2e_rate / bare_rate >= 0.85)
    rates = {"end to end": e2e_rate, "bare forward": bare_rate}
    peak, flops = ws.peak_gflops(), layer_flops(extractor)
    add_utilisation(result, peak, ws.sizes.peak_matmul, flops, rates, "image (InceptionV3 forward)")
    result.notes.append(
        "end to end = hashing the files, decoding and resizing the JPEGs (tf.data), "
        "the forward pass, float16 conversion and writing shards + index"
    )
    return result


def bench_store(ws: Workspace) -> Result:
    if ws.store_dir is None:  # without bench_features: write one, untimed
        ws.store_dir = ws.root / "store"
        ws.extract(ws.images(ws.sizes.feature_images), ws.store_dir)
    store = FeatureStore(ws.store_dir)
    count, float32 = len(store), 4 * math.prod(store.feature_shape)
    per_image = bytes_per_image(ws.store_dir)
    shards = sum(p.stat().st_size for p in ws.store_dir.glob(f"*{SHARD_SUFFIX}"))
    result = Result(f"store: bytes on disk per image ({count} images, one store)")
    result.add("bytes per image (all files)", per_image, "bytes")
    result.add("  of which shards", shards / count, "bytes")
    result.add("  of which index + manifest", per_image - shards / count, "bytes")
    result.add(f"share of float32 ({float32:,} bytes)", 100 * per_image / float32, "%")
    result.check("bytes per image (all files)", f"<= {float32 // 2:,}", per_image <= float32 / 2)
    result.notes.append(
        "shards keep float16 values losslessly: a bitmask of the nonzero values plus those "
        "values (InceptionV3's last block ends in ReLUs, about half of all values are zero)"
    )
    return result
