"""The shard file: (n, L, C) float16 features stored losslessly in about half of float16's bytes.

InceptionV3 ends in ReLUs, so about half of all feature values are exactly
zero; a shard keeps each image as a bitmask of its nonzero values plus those
values. `write_shard` writes one atomically, `ShardReader` maps one and
decodes only the images asked for, `read_shard` reads a whole one (for tools
and tests).

Layout, all little-endian:
  header   32 bytes: magic b"CAPSHRD2", then n, L, C as uint64
  offsets  (n + 1) uint64: byte offset of each image's record from the file
           start; the last one is the file size
  records  per image: a bitmask of its nonzero values (np.packbits order,
           L*C bits, padded to an even byte count so the values stay 2-byte
           aligned), then those values as float16, in row-major order
"Nonzero" is by bit pattern, so -0.0, NaN and subnormals survive bit for bit.
The offsets let a reader fetch any image with two slices of the mapped file.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from captioning.atomic_files import atomic_path

FEATURE_DTYPE = np.float16
SHARD_SUFFIX = ".shard"

_SHARD_MAGIC = b"CAPSHRD2"
_SHARD_HEADER = np.dtype(
    [("magic", "S8"), ("images", "<u8"), ("locations", "<u8"), ("channels", "<u8")]
)
_DECODE_BLOCK = 8  # images decoded at once: their temporaries (~6 MB at 64x2048) stay in cache


def _mask_bytes(values: int) -> int:
    return -(-values // 16) * 2  # ceil(values / 8) rounded up to even


def _encode_shard(fh: BinaryIO, features: np.ndarray) -> None:
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


class ShardReader:
    """A shard file, memory-mapped; `read` decodes only the records of the rows asked for.

    Opening checks the header and the offsets table against the file size, so
    a truncated or foreign file raises ValueError here rather than at a read.
    """

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
        out = np.zeros((len(rows), *self.shape[1:]), FEATURE_DTYPE)  # (k, L, C)
        for start in range(0, len(rows), _DECODE_BLOCK):
            block = rows[start : start + _DECODE_BLOCK]
            target = out[start : start + len(block)].reshape(-1).view(np.uint16)  # (b*L*C,)
            self._decode_block(block, target)
        return out

    def _decode_block(self, block: np.ndarray, target: np.ndarray) -> None:
        """Scatter the nonzero values of `block`'s records into `target`, zero-filled (b*L*C,)."""
        begins, ends = self.offsets[block], self.offsets[block + 1]
        masks = np.stack([self.data[b : b + self.mask_bytes] for b in begins])  # (b, M)
        values = np.concatenate(
            [self.data[b + self.mask_bytes : e] for b, e in zip(begins, ends, strict=True)]
        ).view("<u2")  # (nnz,) float16 bit patterns
        values_per_image = self.shape[1] * self.shape[2]
        nonzero = np.unpackbits(masks, axis=1, count=values_per_image).view(bool)  # (b, L*C)
        # flatnonzero (on bool, not uint8) + fancy assignment: several times faster
        # than a boolean-mask assignment, whose branches mispredict on random zeros.
        positions = np.flatnonzero(nonzero)  # (nnz,) into the block's flat values
        if len(positions) != len(values):
            raise ValueError(f"{self.path}: a record of rows {block.tolist()} is corrupt")
        target[positions] = values


def is_complete_shard(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether `path` is a whole shard of exactly `shape` (n, L, C)."""
    try:
        return ShardReader(path).shape == shape
    except (OSError, ValueError):  # absent, truncated or not a shard
        return False


def write_shard(path: str | Path, features: np.ndarray) -> None:
    """Write (n, L, C) float16 features as one shard file, atomically."""
    features = np.asarray(features)
    if features.ndim != 3 or features.dtype != FEATURE_DTYPE:
        raise ValueError(f"want (n, L, C) float16 features, got {features.dtype} {features.shape}")
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:
        _encode_shard(fh, features)


def read_shard(path: str | Path) -> np.ndarray:
    """A whole shard file as (n, L, C) float16, in memory (for tools and tests).

    Training and evaluation read through `FeatureStore.get`, which decodes only
    the images asked for.
    """
    shard = ShardReader(Path(path))
    return shard.read(np.arange(shard.shape[0]))
