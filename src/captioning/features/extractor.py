"""The InceptionV3 feature extractor: which weights it gets, how it is built, and its identity.

`build_extractor` makes the InceptionV3 (no top) model whose last grid
(8x8x2048 at 299 px) is read as locations of 2048 features, with ImageNet,
random (seeded) or file weights. ImageNet weights come from the keras cache,
or are fetched once through the project's resumable, verified downloader;
without a network `WeightsUnavailableError` says at once how to go on.
`weights_digest` names an extractor by its weights, for shard keys and for
the model that must rebuild the same extractor at inference time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.parse
from pathlib import Path

import keras
import numpy as np

from captioning.data.download import download
from captioning.data.download_failures import DownloadError, RetryPolicy

log = logging.getLogger(__name__)

IMAGENET_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
    + IMAGENET_NOTOP_FILE
)
IMAGENET_NOTOP_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"  # the hash keras.applications checks
# Offline, a user should learn within seconds that the weights are missing: one
# connection attempt of at most this long, and one retry a second later.
DOWNLOAD_TIMEOUT_S = 10.0
_WEIGHTS_RETRIES = 1


class WeightsUnavailableError(FileNotFoundError):
    """The requested extractor weights cannot be found or fetched; the message says how to fix it."""


# ----------------------------------------------------------------------------- ImageNet weights


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
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def _resolve_host(url: str, timeout: float) -> None:
    """Raise OSError unless the URL's host name resolves within `timeout` seconds.

    Socket timeouts do not cover name resolution, which can block far longer
    than that on a machine without a network, so it runs on a daemon thread
    that is left behind when it takes too long.
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    outcome: dict[str, object] = {}

    def resolve() -> None:
        try:
            outcome["addresses"] = socket.getaddrinfo(host, None)
        except OSError as err:
            outcome["error"] = err

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout)
    if "addresses" not in outcome:
        raise OSError(outcome.get("error") or f"{host} did not resolve within {timeout:.0f} s")


def _unavailable(target: Path, problem: str, err: Exception) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"ImageNet weights for InceptionV3 are not available: {problem}"
        f"downloading failed ({err}).\n"
        f"  Fix one of:\n"
        f"  - on a machine with internet, download {IMAGENET_NOTOP_FILE}\n"
        f"    from {IMAGENET_NOTOP_URL}\n"
        f"    and put it at {target} (the keras cache; KERAS_HOME moves it);\n"
        f"  - or set `features.weights: /path/to/{IMAGENET_NOTOP_FILE}` in params.yaml;\n"
        f"  - or set `features.weights: none` to run offline with randomly initialised "
        f"(seeded) InceptionV3 weights."
    )


def imagenet_weights_path(timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The keras ImageNet no-top weights file, downloading it once if needed.

    A cached file with the wrong md5 is removed and fetched again. Raises
    WeightsUnavailableError within seconds when the file is neither cached
    nor downloadable.
    """
    target = keras_cache_dir() / IMAGENET_NOTOP_FILE
    problem = ""
    if target.is_file():
        if _md5(target) == IMAGENET_NOTOP_MD5:
            return target
        problem = (
            f"{target} had an md5 other than {IMAGENET_NOTOP_MD5} (an incomplete copy?) "
            "and was removed. "
        )
        target.unlink()
    retry = RetryPolicy(
        retries=_WEIGHTS_RETRIES,
        backoff_s=1.0,
        connect_timeout_s=timeout,
        read_timeout_s=max(timeout, 60.0),
    )
    try:
        _resolve_host(IMAGENET_NOTOP_URL, timeout)
        log.info("downloading %s to %s", IMAGENET_NOTOP_URL, target)
        download(IMAGENET_NOTOP_URL, target, checksum=f"md5:{IMAGENET_NOTOP_MD5}", retry=retry)
    except (OSError, DownloadError) as err:
        raise _unavailable(target, problem, err) from err
    return target


# ----------------------------------------------------------------------------- the model


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


def _weights_file(weights: str | None) -> Path | None:
    """The weights file that `build_extractor`'s `weights` names; None for random weights."""
    key = "none" if weights is None else str(weights).strip()
    if key.lower() == "imagenet":
        return imagenet_weights_path()
    if key.lower() == "none":
        return None
    path = Path(key).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"features.weights={key!r}: no such file. Give a path to an InceptionV3 "
            f"weights file (.h5 / .weights.h5 / .keras), or `imagenet`, or `none`."
        )
    return path


def build_extractor(weights: str | None, image_size: int = 299, seed: int = 0) -> keras.Model:
    """InceptionV3 without its top, (B, S, S, 3) -> (B, h*w, 2048); (B, 64, 2048) at S=299.

    `weights`: "imagenet" (keras' file, from its cache or downloaded once),
    "none" (random initialisation, seeded by `seed` through
    keras.utils.set_random_seed, which reseeds the global RNGs), or a path to a
    .h5 / .weights.h5 / .keras weights file.
    """
    weights_path = _weights_file(weights)
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
