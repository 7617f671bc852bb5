"""InceptionV3 image features: the one image preprocessing, the extractor, and the feature store.

`preprocess_image` is the only place that turns image bytes into model input;
feature extraction, attention reports and the served model all call it.
`build_extractor` makes the InceptionV3 (no top) model whose 8x8x2048 grid is
read as 64 locations of 2048 features, with ImageNet, random or file weights.
`extract_features` writes a sharded, resumable store (`<split>-NNNNN.shard`
files, `manifest.json` recording what each shard holds, and `index.parquet`
written last), and `FeatureStore` reads it back memory-mapped, so nothing ever
holds the whole data set in RAM. A shard stores float16 features losslessly in
about half of float16's bytes: InceptionV3 ends in ReLUs, so about half of all
values are exactly zero, and each image is kept as a bitmask of its nonzero
values plus those values (the layout is under "shard files" below).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import urllib.request
import weakref
from collections.abc import Iterable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

IMAGENET_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
    + IMAGENET_NOTOP_FILE
)
IMAGENET_NOTOP_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"  # the hash keras.applications checks
DOWNLOAD_TIMEOUT_S = 10.0

INDEX_FILE = "index.parquet"
MANIFEST_FILE = "manifest.json"
FEATURE_DTYPE = np.float16
SHARD_SUFFIX = ".shard"
# Format-1 stores had `.npy` shards: matched too, so re-extraction removes them.
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<number>\d{5})\.(shard|npy)$")
_TMP_SUFFIX = ".tmp"
_FORMAT = 2  # bump when a shard key or the shard layout changes, so old shards are redone


class WeightsUnavailableError(FileNotFoundError):
    """The requested extractor weights cannot be found or fetched; the message says how to fix it."""


# ----------------------------------------------------------------------------- preprocessing


def preprocess_image(image_bytes: tf.Tensor | bytes, image_size: int = 299) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> InceptionV3 input (image_size, image_size, 3) float32 in [-1, 1].

    The format is sniffed from the content, not the file name. Works eagerly
    and inside tf.data / tf.function (graph mode).
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)  # (h, w, 3) uint8
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")  # (S, S, 3) float32
    return keras.applications.inception_v3.preprocess_input(image)  # (S, S, 3) in [-1, 1]


def load_image(path: tf.Tensor | str, image_size: int = 299) -> tf.Tensor:
    """Read an image file and preprocess it (graph-safe)."""
    return preprocess_image(tf.io.read_file(path), image_size)


# ----------------------------------------------------------------------------- extractor


def keras_cache_dir() -> Path:
    """Where keras keeps downloaded weights: `$KERAS_HOME/models`, else `~/.keras/models`.

    Read at call time (keras itself reads KERAS_HOME once, at import).
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return Path(home) / "models"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path, timeout: float) -> None:
    """Fetch url to dest atomically; give up after `timeout` s even if name resolution hangs."""
    # urlopen's timeout does not cover DNS, which can block for much longer
    # offline, so the connection is opened on a daemon thread we stop waiting for.
    result: dict = {}

    def connect() -> None:
        try:
            result["response"] = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310
        except Exception as err:  # reported to the caller below
            result["error"] = err

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if "response" not in result:
        raise OSError(result.get("error") or f"no connection within {timeout:.0f} s")
    tmp = dest.with_name(dest.name + _TMP_SUFFIX)
    try:
        with result["response"] as response, open(tmp, "wb") as fh:
            for block in iter(lambda: response.read(1 << 20), b""):
                fh.write(block)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def imagenet_weights_path(timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The keras ImageNet no-top weights file, downloading it once if needed.

    Raises WeightsUnavailableError at once when it is neither cached nor downloadable.
    """
    target = keras_cache_dir() / IMAGENET_NOTOP_FILE
    problem = ""
    if target.is_file():
        if _md5(target) == IMAGENET_NOTOP_MD5:
            return target
        problem = f"{target} exists but its md5 is not {IMAGENET_NOTOP_MD5} (incomplete copy?). "
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", IMAGENET_NOTOP_URL, target)
        _download(IMAGENET_NOTOP_URL, target, timeout)
        if _md5(target) != IMAGENET_NOTOP_MD5:
            target.unlink()
            raise OSError("the downloaded file has the wrong md5")
        return target
    except OSError as err:
        raise WeightsUnavailableError(
            f"ImageNet weights for InceptionV3 are not available: {problem}"
            f"downloading failed ({err}).\n"
            f"  Fix one of:\n"
            f"  - on a machine with internet, download {IMAGENET_NOTOP_FILE}\n"
            f"    from {IMAGENET_NOTOP_URL}\n"
            f"    and put it at {target} (the keras cache; KERAS_HOME moves it);\n"
            f"  - or set `features.weights: /path/to/{IMAGENET_NOTOP_FILE}` in params.yaml;\n"
            f"  - or set `features.weights: none` to run offline with randomly initialised "
            f"(seeded) InceptionV3 weights."
        ) from err


def _inception(image_size: int, include_top: bool = False) -> keras.Model:
    shape = (image_size, image_size, 3)
    return keras.applications.InceptionV3(include_top=include_top, weights=None, input_shape=shape)


def _load_weights_file(backbone: keras.Model, path: Path, image_size: int) -> None:
    """Load a weights file into the no-top backbone, accepting a with-top ImageNet file too."""
    if path.name.endswith((".weights.h5", ".keras")):
        # Keras 3 native files address layers by class and position, not by the
        # auto-generated names, so a strict load works across sessions.
        backbone.load_weights(path)
        return
    # Legacy .h5 (what keras.applications ships). Loading "by_name" would be
    # fragile: auto names (conv2d_94, ...) depend on what the session built
    # before, and skip_mismatch would then silently load nothing. So load by
    # topology: first as a no-top file, then as a with-top (1000-class) file
    # whose leading layers are exactly the no-top backbone.
    try:
        backbone.load_weights(path)
        return
    except ValueError as no_top_error:
        full = _inception(image_size, include_top=True)
        try:
            full.load_weights(path)
        except ValueError as top_error:
            raise ValueError(
                f"{path}: not InceptionV3 weights (as a no-top file: {no_top_error}; "
                f"as a with-top file: {top_error})"
            ) from top_error
    for mine, theirs in zip(backbone.layers, full.layers, strict=False):
        mine.set_weights(theirs.get_weights())


def build_extractor(weights: str | None, image_size: int = 299, seed: int = 0) -> keras.Model:
    """InceptionV3 without its top, (B, S, S, 3) -> (B, h*w, 2048); (B, 64, 2048) at S=299.

    `weights`: "imagenet" (keras' file, from its cache or downloaded once),
    "none" (random initialisation, seeded by `seed` through
    keras.utils.set_random_seed, which reseeds the global RNGs), or a path to a
    .h5 / .weights.h5 / .keras weights file.
    """
    key = "none" if weights is None else str(weights).strip()
    if key.lower() == "imagenet":
        weights_path: Path | None = imagenet_weights_path()
    elif key.lower() == "none":
        weights_path = None
    else:
        weights_path = Path(key).expanduser()
        if not weights_path.is_file():
            raise WeightsUnavailableError(
                f"features.weights={key!r}: no such file. Give a path to an InceptionV3 "
                f"weights file (.h5 / .weights.h5 / .keras), or `imagenet`, or `none`."
            )

    if weights_path is None:
        keras.utils.set_random_seed(seed)
    backbone = _inception(image_size)
    if weights_path is not None:
        _load_weights_file(backbone, weights_path, image_size)

    h, w, channels = backbone.output.shape[1:]  # (B, h, w, 2048)
    locations = keras.layers.Reshape((h * w, channels), name="grid_to_locations")(backbone.output)
    return keras.Model(backbone.inputs, locations, name="inception_v3_features")  # (B, h*w, 2048)


def weights_digest(model: keras.Model) -> str:
    """sha256 over a model's weights: the identity of an extractor in shard keys."""
    digest = hashlib.sha256()
    # By position, not by variable path: paths carry auto-generated layer names
    # (conv2d_94/...) that differ between sessions building the same model.
    for number, weight in enumerate(model.weights):
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{number}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- shard files
#
# A shard holds n images of (L, C) float16 features, all little-endian:
#   header   32 bytes: magic b"CAPSHRD2", then n, L, C as uint64
#   offsets  (n + 1) uint64: byte offset of each image's record from the file
#            start; the last one is the file size
#   records  per image: a bitmask of its nonzero values (np.packbits order,
#            L*C bits, padded to an even byte count so the values stay 2-byte
#            aligned), then those values as float16, in row-major order
# "Nonzero" is by bit pattern, so -0.0, NaN and subnormals survive bit for bit.
# The offsets let a reader fetch any image with two slices of the mapped file.

_SHARD_MAGIC = b"CAPSHRD2"
_SHARD_HEADER = np.dtype(
    [("magic", "S8"), ("images", "<u8"), ("locations", "<u8"), ("channels", "<u8")]
)
_DECODE_BLOCK = 8  # images decoded at once: their temporaries (~6 MB at 64x2048) stay in cache


def _mask_bytes(values: int) -> int:
    return -(-values // 16) * 2  # ceil(values / 8) rounded up to even


def _encode_shard(fh, features: np.ndarray) -> None:
    """Write (n, L, C) float16 features to an open binary file in the shard layout."""
    n, locations, channels = features.shape
    bits = np.ascontiguousarray(features, "<f2").reshape(n, -1).view("<u2")  # (n, L*C)
    mask_bytes = _mask_bytes(locations * channels)
    # Counted row by row: count_nonzero(axis=1) would make an (n, L*C) bool temporary.
    nonzeros = np.array([np.count_nonzero(row) for row in bits], np.int64)  # (n,)
    sizes = mask_bytes + 2 * nonzeros  # (n,) record bytes
    first = _SHARD_HEADER.itemsize + 8 * (n + 1)
    offsets = first + np.concatenate([[0], np.cumsum(sizes)])  # (n + 1,)
    fh.write(np.array([(_SHARD_MAGIC, n, locations, channels)], _SHARD_HEADER).tobytes())
    fh.write(offsets.astype("<u8").tobytes())
    for row in bits:  # one image at a time: the mask temporaries stay small
        nonzero = row != 0
        packed = np.packbits(nonzero)
        fh.write(packed.tobytes() + bytes(mask_bytes - len(packed)))
        fh.write(row[nonzero].tobytes())


class _SparseShard:
    """A shard file, memory-mapped; `read` decodes only the records of the rows asked for."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        head = _SHARD_HEADER.itemsize
        if size < head:
            raise ValueError(f"{path}: {size} bytes, shorter than a shard header")
        self.data = np.memmap(path, np.uint8, mode="r")  # (size,) the whole file, mapped
        header = self.data[:head].view(_SHARD_HEADER)[0]
        if header["magic"] != _SHARD_MAGIC:
            raise ValueError(f"{path}: not a feature shard (magic {bytes(header['magic'])!r})")
        n, locations, channels = (int(header[k]) for k in ("images", "locations", "channels"))
        self.shape = (n, locations, channels)
        self.mask_bytes = _mask_bytes(locations * channels)
        if size < head + 8 * (n + 1):
            raise ValueError(f"{path}: truncated in its offsets table")
        offsets = np.array(self.data[head : head + 8 * (n + 1)].view("<u8"), np.int64)
        records = np.diff(offsets) - self.mask_bytes  # (n,) value bytes of each image
        if (
            offsets[0] != head + 8 * (n + 1)
            or offsets[-1] != size
            or (records < 0).any()
            or (records % 2).any()
        ):
            raise ValueError(f"{path}: {size} bytes, offsets say {offsets[-1]} (truncated?)")
        self.offsets = offsets  # (n + 1,)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Features of the given rows, in that order: (k, L, C) float16."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        values_per_image = self.shape[1] * self.shape[2]
        out = np.zeros((len(rows), *self.shape[1:]), FEATURE_DTYPE)  # (k, L, C)
        for start in range(0, len(rows), _DECODE_BLOCK):
            block = rows[start : start + _DECODE_BLOCK]
            begins, ends = self.offsets[block], self.offsets[block + 1]
            masks = np.stack([self.data[b : b + self.mask_bytes] for b in begins])  # (b, M)
            values = np.concatenate(
                [self.data[b + self.mask_bytes : e] for b, e in zip(begins, ends, strict=True)]
            ).view("<u2")  # (nnz,) float16 bit patterns
            nonzero = np.unpackbits(masks, axis=1, count=values_per_image).view(bool)  # (b, L*C)
            # flatnonzero (on bool, not uint8) + fancy assignment: several times faster
            # than a boolean-mask assignment, whose branches mispredict on random zeros.
            positions = np.flatnonzero(nonzero)  # (nnz,) into the block's flat values
            if len(positions) != len(values):
                raise ValueError(f"{self.path}: a record of rows {block.tolist()} is corrupt")
            target = out[start : start + len(block)].reshape(-1).view(np.uint16)  # (b*L*C,)
            target[positions] = values
        return out


class _NpyShard:
    """A format-1 shard: a float16 `.npy` array (n, L, C).

    Read so that older stores and hand-written test stores keep working;
    `extract_features` never writes one and replaces any it finds.
    """

    def __init__(self, path: Path):
        self.array = np.load(path, mmap_mode="r")  # (n, L, C)
        if self.array.ndim != 3 or self.array.dtype != FEATURE_DTYPE:
            raise ValueError(
                f"{path}: {self.array.dtype} {self.array.shape}, not (n, L, C) float16"
            )
        self.shape = self.array.shape

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[np.asarray(rows, np.int64).reshape(-1)])  # (k, L, C)


def _open_shard(path: Path) -> _SparseShard | _NpyShard:
    return _NpyShard(path) if path.suffix == ".npy" else _SparseShard(path)


def write_shard(path: str | Path, features: np.ndarray) -> None:
    """Write (n, L, C) float16 features as one shard file, atomically (for tools and tests)."""
    features = np.asarray(features)
    if features.ndim != 3 or features.dtype != FEATURE_DTYPE:
        raise ValueError(f"want (n, L, C) float16 features, got {features.dtype} {features.shape}")
    _atomic_write(Path(path), lambda fh: _encode_shard(fh, features))


def read_shard(path: str | Path) -> np.ndarray:
    """A whole shard file (either format) as (n, L, C) float16, in memory (for tools and tests).

    Training and evaluation read through `FeatureStore.get`, which decodes only
    the images asked for.
    """
    shard = _open_shard(Path(path))
    return shard.read(np.arange(shard.shape[0]))


# ----------------------------------------------------------------------------- writer


def _shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}{SHARD_SUFFIX}"


def _atomic_write(path: Path, write) -> None:
    """Call write(file object) on a temp file beside `path`, then rename it into place."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _complete_shard(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        return _SparseShard(path).shape == shape
    except (OSError, ValueError):  # absent, truncated or not a shard
        return False


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


def _plan_shards(table: pd.DataFrame, shard_size: int, model_key: dict) -> list[dict]:
    """Cut each split into shards and give each a key naming exactly what it will hold.

    The key hashes the image bytes (not paths, sizes or times): regenerated
    images with the same names and sizes must not reuse old shards, while a
    moved data root or a fresh checkout of the same files should. Reading every
    image once more costs little next to running InceptionV3 on it.
    """
    shards = []
    for split, rows in table.groupby("split", sort=True):
        for number, start in enumerate(range(0, len(rows), shard_size)):
            part = rows.iloc[start : start + shard_size]
            images = [
                [int(i), _file_digest(p)]
                for i, p in zip(part["image_id"], part["path"], strict=True)
            ]
            content = dict(model_key, format=_FORMAT, split=split, images=images)
            key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
            shards.append(
                {
                    "name": _shard_name(split, number),
                    "split": split,
                    "image_ids": part["image_id"].to_numpy(),
                    "paths": part["path"].tolist(),
                    "key": key,
                }
            )
    return shards


def _read_manifest(out: Path) -> dict[str, str]:
    try:
        return dict(json.loads((out / MANIFEST_FILE).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_manifest(out: Path, keys: dict[str, str]) -> None:
    text = json.dumps({"format": _FORMAT, "shards": dict(sorted(keys.items()))}, indent=1)
    _atomic_write(out / MANIFEST_FILE, lambda fh: fh.write(text.encode() + b"\n"))


def _keep_finished_shards(out: Path, shards: list[dict], shape: tuple[int, int]) -> dict[str, str]:
    """Delete what does not belong to this run; return {name: key} of shards to keep.

    A shard is kept only if the manifest gives it this run's key and the file
    is whole; the manifest is rewritten to exactly those before anything new
    is written, so it never vouches for a shard that is about to change.
    """
    (out / INDEX_FILE).unlink(missing_ok=True)  # its presence must keep meaning "finished"
    wanted = {shard["name"] for shard in shards}
    for path in out.iterdir():
        stale_shard = _SHARD_RE.match(path.name) and path.name not in wanted
        if path.is_file() and (stale_shard or path.name.endswith(_TMP_SUFFIX)):
            log.info("removing stale %s", path)
            path.unlink()
    recorded = _read_manifest(out)
    done = {
        shard["name"]: shard["key"]
        for shard in shards
        if recorded.get(shard["name"]) == shard["key"]
        and _complete_shard(out / shard["name"], (len(shard["paths"]), *shape))
    }
    _write_manifest(out, done)
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


def _batches(shards: list[dict], image_size: int, batch_size: int) -> tf.data.Dataset:
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
            .map(lambda p: load_image(p, image_size), num_parallel_calls=tf.data.AUTOTUNE)
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


def extract_features(
    images: pd.DataFrame,
    out_dir: str | Path,
    extractor: keras.Model,
    batch_size: int = 32,
    shard_size: int = 1024,
    image_size: int = 299,
    progress: bool = True,
) -> pd.DataFrame:
    """Write the feature store for `images` (columns image_id, path, split) and return its index.

    Shards already written for the same images and extractor are kept, so a
    killed run resumes; the result is byte-identical to an uninterrupted run.
    Stale shards, temp files and the old index are removed first; the index
    (image_id, split, shard, row) is written last, so its presence means done.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    model_input = tuple(extractor.input_shape[1:])
    if model_input[:2] not in ((image_size, image_size), (None, None)):
        raise ValueError(f"extractor expects input {model_input}, not {image_size}x{image_size}")
    locations, channels = extractor.output_shape[1:]  # (B, L, C)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _unique_images(images)
    model_key = {
        "weights": weights_digest(extractor),
        "image_size": image_size,
        "batch_size": batch_size,  # CPU kernels may round differently for other batch sizes
        "output": [locations, channels],
    }
    shards = _plan_shards(table, shard_size, model_key)

    done = _keep_finished_shards(out, shards, (locations, channels))
    pending = [shard for shard in shards if shard["name"] not in done]
    log.info("features: %d shards kept, %d to write", len(done), len(pending))

    forward = _forward(extractor, image_size)
    bar = tqdm(
        total=len(table),
        initial=len(table) - sum(len(s["paths"]) for s in pending),
        unit="img",
        desc="features",
        disable=not progress,
    )
    batches = iter(_batches(pending, image_size, batch_size)) if pending else iter(())
    with bar:
        for shard in pending:
            count = len(shard["paths"])
            features = np.empty((count, locations, channels), FEATURE_DTYPE)  # (n, L, C)
            for start in range(0, count, batch_size):
                try:
                    batch = next(batches)  # (b, S, S, 3)
                except tf.errors.OpError as err:
                    raise ValueError(
                        f"could not read or decode an image of shard {shard['name']} "
                        f"({shard['paths'][start : start + batch_size]}): {err.message}"
                    ) from err
                features[start : start + len(batch)] = forward(batch).numpy()  # (b, L, C)
                bar.update(len(batch))
            _atomic_write(out / shard["name"], lambda fh, a=features: _encode_shard(fh, a))
            done[shard["name"]] = shard["key"]
            _write_manifest(out, done)

    index = _index_table(shards)
    _atomic_write(out / INDEX_FILE, lambda fh: index.to_parquet(fh, index=False))
    return index


# ----------------------------------------------------------------------------- reader


class FeatureStore:
    """Read-only, memory-mapped view of a feature store written by `extract_features`."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: feature extraction did not finish")
        self.index = pd.read_parquet(index_path)
        self._ids = pd.Index(self.index["image_id"].to_numpy())
        codes, names = pd.factorize(self.index["shard"])
        self._shard_codes = codes  # (N,) position -> shard number
        self._shard_names = list(names)
        self._rows = self.index["row"].to_numpy()  # (N,)
        self._shards: dict[int, _SparseShard | _NpyShard] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, code: int) -> _SparseShard | _NpyShard:
        """The shard file, opened memory-mapped on first use."""
        if code not in self._shards:
            self._shards[code] = _open_shard(self.root / self._shard_names[code])
        return self._shards[code]

    @property
    def feature_shape(self) -> tuple[int, int] | None:
        """(locations, channels), e.g. (64, 2048); None for an empty store."""
        return tuple(self._shard(0).shape[1:]) if self._shard_names else None

    @property
    def splits(self) -> list[str]:
        return sorted(self.index["split"].unique())

    def image_ids(self, split: str) -> np.ndarray:
        """Image ids of one split, in store order (int64)."""
        return self.index.loc[self.index["split"] == split, "image_id"].to_numpy()

    def get(self, image_ids: Iterable[int]) -> np.ndarray:
        """Features of the given images, in the order asked: (k, L, C) float16."""
        ids = np.asarray(
            image_ids if isinstance(image_ids, np.ndarray) else list(image_ids), dtype=np.int64
        ).reshape(-1)
        positions = self._ids.get_indexer(ids)  # (k,), -1 where unknown
        if (positions < 0).any():
            raise KeyError(
                f"image ids not in the feature store: {ids[positions < 0][:10].tolist()}"
            )
        if not len(ids):
            return np.empty((0, *(self.feature_shape or (0, 0))), FEATURE_DTYPE)
        codes = self._shard_codes[positions]  # (k,)
        shards = np.unique(codes)
        if len(shards) == 1:  # the usual case: decode straight into the result
            return self._shard(shards[0]).read(self._rows[positions])
        out = np.empty((len(ids), *self.feature_shape), FEATURE_DTYPE)  # (k, L, C)
        for code in shards:
            wanted = np.flatnonzero(codes == code)
            out[wanted] = self._shard(code).read(self._rows[positions[wanted]])
        return out

    def feature_stats(
        self, split: str = "train", max_images: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and (population) std over all locations of a split's images.

        Streams over shards in float64 chunks (Chan et al.'s pairwise update),
        so memory stays a few tens of MB whatever the store size. Uses the
        first `max_images` images of the split when given. Returns float64 (C,).
        """
        rows = self.index[self.index["split"] == split]
        if max_images is not None:
            rows = rows.iloc[:max_images]
        if rows.empty:
            raise ValueError(f"no images of split {split!r} in {self.root}")
        locations, channels = self.feature_shape
        chunk = max(1, (1 << 22) // (locations * channels))  # images per ~32 MB float64 chunk
        count, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
        for shard, part in rows.groupby("shard", sort=False):
            reader = self._shard(self._shard_names.index(shard))
            picks = part["row"].to_numpy()
            for start in range(0, len(picks), chunk):
                block = reader.read(picks[start : start + chunk]).astype(np.float64)  # (c, L, C)
                block = block.reshape(-1, channels)  # (c*L, C)
                n_b = len(block)
                mean_b = block.mean(axis=0)
                m2_b = ((block - mean_b) ** 2).sum(axis=0)
                total = count + n_b
                delta = mean_b - mean
                mean = mean + delta * (n_b / total)
                m2 = m2 + m2_b + delta**2 * (count * n_b / total)
                count = total
        return mean, np.sqrt(m2 / count)

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk of every file in the store: shards, manifest, index, extractor.json."""
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())


def bytes_per_image(out_dir: str | Path) -> float:
    """Average bytes on disk per stored image (for capacity planning and benchmarks)."""
    store = FeatureStore(out_dir)
    return store.disk_bytes / max(1, len(store))
