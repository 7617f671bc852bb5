"""Resumable feature extraction: images -> InceptionV3 features in a sharded store.

`extract_features` cuts each split into shards of `shard_size` images, gives
each shard a key naming exactly what it will hold (the image bytes, the
extractor's weights, the input size, the batch size, the store format), and
records finished shards with their keys (`captioning.features.manifest`). A
killed run resumes: shards whose key and file are whole are kept, the rest are
written again, and the result is byte-identical to an uninterrupted run
because batches are cut at shard boundaries. For the same reason a store can
be extracted in parts (`part` K of `parts` N: every N-th shard), run
independently on several hosts; a whole-store run afterwards keeps every
part's shards and merges them, byte-identical to a store extracted in one go.
`index.parquet` is written last, by the whole-store run only, so its presence
means the store is finished. Images are read through
`captioning.features.preprocessing.load_image`, the same decoding and preprocessing
that serving uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import weakref
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from captioning.atomic_files import atomic_path, atomic_write, is_temporary
from captioning.data.images import DEFAULT_MAX_PIXELS
from captioning.features.extractor import weights_digest
from captioning.features.manifest import (
    STORE_FORMAT,
    recorded_keys,
    remove_part_manifests,
    write_manifest,
    write_part_manifest,
)
from captioning.features.preprocessing import load_image
from captioning.features.shards import (
    FEATURE_DTYPE,
    SHARD_SUFFIX,
    is_complete_shard,
    write_shard,
)
from captioning.features.store import INDEX_FILE

log = logging.getLogger(__name__)

EXTRACTOR_SPEC_FILE = "extractor.json"
# `.npy` shards (the older store format) match too, so extraction removes them.
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<number>\d{5})\.(shard|npy)$")
_TF_NODE_TAG = re.compile(r"\{\{[^}]*\}\}")  # TF's {{function_node ...}} markers in op errors


def _shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}{SHARD_SUFFIX}"


# ----------------------------------------------------------------------------- planning


def _unique_images(images: pd.DataFrame) -> pd.DataFrame:
    """One row per image in store order (split, image_id); tolerates repeated identical rows."""
    missing = {"image_id", "path", "split"} - set(images.columns)
    if missing:
        raise ValueError(f"images table lacks column(s) {sorted(missing)}")
    table = images[["image_id", "path", "split"]].astype(
        {"image_id": "int64", "path": str, "split": str}
    )
    table = table.drop_duplicates()
    clashes = table["image_id"][table["image_id"].duplicated()]
    if len(clashes):
        raise ValueError(f"image ids with more than one path or split: {sorted(set(clashes))[:10]}")
    return table.sort_values(["split", "image_id"], kind="stable").reset_index(drop=True)


def _file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _plan_shards(table: pd.DataFrame, shard_size: int) -> list[dict]:
    """Cut each split into shards: name, split, image ids and paths of each, in store order."""
    shards = []
    for split, rows in table.groupby("split", sort=True):
        for number, start in enumerate(range(0, len(rows), shard_size)):
            part = rows.iloc[start : start + shard_size]
            shards.append(
                {
                    "name": _shard_name(split, number),
                    "split": split,
                    "image_ids": part["image_id"].to_numpy(),
                    "paths": part["path"].tolist(),
                }
            )
    return shards


def _add_keys(shards: list[dict], model_key: dict) -> None:
    """Give each shard a key naming exactly what it will hold.

    The key hashes the image bytes (not paths, sizes or times): regenerated
    images with the same names and sizes must not reuse old shards, while a
    moved data root or a fresh checkout of the same files should. Reading every
    image once more costs little next to running InceptionV3 on it; a part
    reads only its own shards' images.
    """
    for shard in shards:
        images = [
            [int(i), _file_digest(p)]
            for i, p in zip(shard["image_ids"], shard["paths"], strict=True)
        ]
        content = dict(model_key, format=STORE_FORMAT, split=shard["split"], images=images)
        shard["key"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- what to keep


def _remove_leftovers(out: Path, wanted: set[str], temporary: bool) -> None:
    """Delete the old index, shards no run of this plan writes, and (`temporary`) temp files.

    A part leaves temp files alone: they may be another part's writes in flight.
    """
    (out / INDEX_FILE).unlink(missing_ok=True)  # its presence must keep meaning "finished"
    for path in out.iterdir():
        stale_shard = _SHARD_RE.match(path.name) and path.name not in wanted
        if path.is_file() and (stale_shard or (temporary and is_temporary(path))):
            log.info("removing stale %s", path)
            path.unlink(missing_ok=True)  # parts on other hosts may remove it too


def _finished(out: Path, shards: list[dict], shape: tuple[int, int]) -> dict[str, str]:
    """{name: key} of the given shards that the records vouch for and whose files are whole."""
    recorded = recorded_keys(out)
    return {
        shard["name"]: shard["key"]
        for shard in shards
        if recorded.get(shard["name"]) == shard["key"]
        and is_complete_shard(out / shard["name"], (len(shard["paths"]), *shape))
    }


def _keep_finished_shards(out: Path, shards: list[dict], shape: tuple[int, int]) -> dict[str, str]:
    """Whole-store run: clear what does not belong, merge the parts' records; {name: key} kept.

    The manifest is rewritten to exactly the kept shards before anything new
    is written, so it never vouches for a shard that is about to change.
    """
    _remove_leftovers(out, {shard["name"] for shard in shards}, temporary=True)
    done = _finished(out, shards, shape)
    write_manifest(out, done)
    remove_part_manifests(out)
    return done


def _keep_finished_part(
    out: Path, shards: list[dict], mine: list[dict], shape: tuple[int, int], part: int, parts: int
) -> dict[str, str]:
    """Part run: like `_keep_finished_shards`, but it records only its own shards, in its own file."""
    _remove_leftovers(out, {shard["name"] for shard in shards}, temporary=False)
    done = _finished(out, mine, shape)
    write_part_manifest(out, part, parts, {s["name"]: done.get(s["name"]) for s in mine})
    return done


def _index_table(shards: list[dict]) -> pd.DataFrame:
    """image_id, split, shard, row for every stored image, in store order."""
    return pd.DataFrame(
        {
            "image_id": np.array(
                [i for shard in shards for i in shard["image_ids"]], dtype=np.int64
            ),
            "split": pd.Series(
                [shard["split"] for shard in shards for _ in shard["paths"]], dtype=object
            ),
            "shard": pd.Series(
                [shard["name"] for shard in shards for _ in shard["paths"]], dtype=object
            ),
            "row": np.array(
                [row for shard in shards for row in range(len(shard["paths"]))], dtype=np.int64
            ),
        }
    )


# ----------------------------------------------------------------------------- running the model


def _batches(
    shards: list[dict], image_size: int, batch_size: int, max_pixels: int
) -> tf.data.Dataset:
    """Preprocessed image batches for the given shards, batch boundaries aligned to shards.

    Aligning batches to shards means a resumed run feeds the model exactly the
    batches an uninterrupted run would, so the bytes on disk are the same.
    """
    paths = tf.constant([p for shard in shards for p in shard["paths"]], tf.string)  # (N,)
    bounds = np.cumsum([0] + [len(shard["paths"]) for shard in shards])
    starts = tf.constant(bounds[:-1], tf.int64)
    ends = tf.constant(bounds[1:], tf.int64)

    def shard_batches(i):
        return (
            tf.data.Dataset.from_tensor_slices(paths[starts[i] : ends[i]])
            .map(
                lambda p: load_image(p, image_size, max_pixels),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            .batch(batch_size)  # (b, S, S, 3)
        )

    return tf.data.Dataset.range(len(shards)).flat_map(shard_batches).prefetch(tf.data.AUTOTUNE)


_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward(extractor: keras.Model, image_size: int):
    """The extractor as a traced inference function (B, S, S, 3) -> (B, L, C), one per model.

    Tracing InceptionV3 takes seconds, so it is kept for later calls with the
    same model (a resumed run in the same process, tests).
    """
    cached = _FORWARDS.setdefault(extractor, {})
    if image_size not in cached:
        model = weakref.ref(extractor)  # a strong reference here would keep the cache entry alive
        spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
        cached[image_size] = tf.function(
            lambda x: model()(x, training=False), input_signature=[spec]
        )
    return cached[image_size]


def _first_line(message: str) -> str:
    """The reader's own message from a tf.data error, without TF's node tags and traceback."""
    lines = _TF_NODE_TAG.sub("", message).strip().splitlines()
    return lines[0] if lines else message


def _shard_features(
    shard: dict, batches, forward, shape: tuple[int, int], batch_size: int, bar
) -> np.ndarray:
    """Run the model over the next batches of `batches`, those of `shard`: (n, L, C) float16."""
    count = len(shard["paths"])
    features = np.empty((count, *shape), FEATURE_DTYPE)  # (n, L, C)
    start = 0
    while start < count:
        try:
            batch = next(batches)  # (b, S, S, 3)
        except tf.errors.OpError as err:
            raise ValueError(
                f"could not read or decode an image of shard {shard['name']} "
                f"({shard['paths'][start : start + batch_size]}): {_first_line(err.message)}"
            ) from err
        features[start : start + len(batch)] = forward(batch).numpy()  # (b, L, C)
        start += len(batch)
        bar.update(len(batch))
    return features


def _model_key(extractor: keras.Model, image_size: int, batch_size: int) -> dict:
    """What, besides the images, decides a shard's bytes; checks the extractor's input size."""
    model_input = tuple(extractor.input_shape[1:])
    if model_input[:2] not in ((image_size, image_size), (None, None)):
        raise ValueError(f"extractor expects input {model_input}, not {image_size}x{image_size}")
    return {
        "weights": weights_digest(extractor),
        "image_size": image_size,
        "batch_size": batch_size,  # CPU kernels may round differently for other batch sizes
        "output": list(extractor.output_shape[1:]),  # (L, C)
    }


def _part_shards(shards: list[dict], part: int, parts: int) -> list[dict]:
    """Part K of N writes every N-th shard from the K-th: splits and short last shards spread evenly."""
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"part must be in 0..{parts - 1} of parts={parts}, got {part}")
    return shards[part::parts]


@dataclasses.dataclass(frozen=True)
class _ModelRun:
    """How the pending shards go through the model."""

    extractor: keras.Model
    image_size: int
    batch_size: int
    shape: tuple[int, int]  # (L, C) per image
    max_pixels: int
    progress: bool


def _write_shards(
    out: Path, pending: list[dict], total: int, done: dict[str, str], record, run: _ModelRun
) -> None:
    """Run the model over the pending shards, writing each and then `record(done)`."""
    forward = _forward(run.extractor, run.image_size)
    left = sum(len(s["paths"]) for s in pending)
    batches = iter(
        _batches(pending, run.image_size, run.batch_size, run.max_pixels) if pending else ()
    )
    bar = tqdm(
        total=total, initial=total - left, unit="img", desc="features", disable=not run.progress
    )
    with bar:
        for shard in pending:
            features = _shard_features(shard, batches, forward, run.shape, run.batch_size, bar)
            write_shard(out / shard["name"], features)
            done[shard["name"]] = shard["key"]
            record(done)


def extract_features(
    images: pd.DataFrame,
    out_dir: str | Path,
    extractor: keras.Model,
    batch_size: int = 32,
    shard_size: int = 1024,
    image_size: int = 299,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    part: int = 0,
    parts: int = 1,
) -> pd.DataFrame:
    """Write the feature store for `images` (columns image_id, path, split) and return its index.

    Shards already written for the same images and extractor are kept, so a
    killed run resumes; the result is byte-identical to an uninterrupted run.
    Stale shards, temp files and the old index are removed first; the index
    (image_id, split, shard, row) is written last, so its presence means done.
    With `parts` N > 1 only part `part` K is extracted (every N-th shard from
    the K-th), recorded in its own manifest and without an index: the index
    rows of its shards are returned. A whole-store run (`parts=1`) afterwards
    keeps the parts' shards and writes only what is missing, the manifest and
    the index. An image that cannot be read (`captioning.data.images`, at most
    `max_pixels` pixels) raises ValueError naming its shard.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    model_key = _model_key(extractor, image_size, batch_size)
    shape = tuple(extractor.output_shape[1:])  # (L, C)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(_unique_images(images), shard_size)
    mine = _part_shards(shards, part, parts)
    _add_keys(mine, model_key)

    if parts == 1:
        done = _keep_finished_shards(out, shards, shape)

        def record(done: dict[str, str]) -> None:
            write_manifest(out, done)
    else:
        done = _keep_finished_part(out, shards, mine, shape, part, parts)

        def record(done: dict[str, str]) -> None:
            write_part_manifest(out, part, parts, {s["name"]: done.get(s["name"]) for s in mine})

    pending = [shard for shard in mine if shard["name"] not in done]
    log.info("features: %d shards kept, %d to write", len(done), len(pending))
    run = _ModelRun(extractor, image_size, batch_size, shape, max_pixels, progress)
    _write_shards(out, pending, sum(len(s["paths"]) for s in mine), done, record, run)

    index = _index_table(mine)
    if parts == 1:
        with atomic_path(out / INDEX_FILE, ".parquet") as tmp:
            index.to_parquet(tmp, index=False)
    return index


def write_extractor_spec(
    out_dir: str | Path, extractor: keras.Model, weights: str, image_size: int, seed: int
) -> None:
    """`extractor.json`: what the model must rebuild at inference time (ModelConfig.extractor_*)."""
    spec = {
        "image_size": image_size,
        "extractor_weights": weights,
        "extractor_seed": seed,
        "extractor_digest": weights_digest(extractor),
    }
    atomic_write(Path(out_dir) / EXTRACTOR_SPEC_FILE, json.dumps(spec, indent=2) + "\n")
