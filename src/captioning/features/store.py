"""The feature store reader: image id -> (L, C) float16 features, memory-mapped from shards.

A store is a folder written by `captioning.features.extraction`: shard files
(`captioning.features.shards`), `manifest.json`, and `index.parquet` (image_id,
split, shard, row), written last, so its presence means the store is whole.
`FeatureStore` opens shards on first use and decodes only the images asked
for, so nothing ever holds the whole data set in RAM.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from captioning.features.shards import FEATURE_DTYPE, SHARD_SUFFIX, ShardReader

INDEX_FILE = "index.parquet"


class FeatureStore:
    """Read-only, memory-mapped view of a feature store written by `extract_features`."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: feature extraction did not finish")
        self.index = pd.read_parquet(index_path)
        codes, names = pd.factorize(self.index["shard"])
        foreign = [name for name in names if not name.endswith(SHARD_SUFFIX)]
        if foreign:
            raise ValueError(
                f"{self.root} holds shards in an older format ({foreign[0]}, ...); run the "
                "features stage again (`dvc repro features`), which rewrites the store"
            )
        self._ids = pd.Index(self.index["image_id"].to_numpy())
        self._shard_codes = codes  # (N,) position -> shard number
        self._shard_names = list(names)
        self._rows = self.index["row"].to_numpy()  # (N,)
        self._shards: dict[int, ShardReader] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, code: int) -> ShardReader:
        """The shard file, opened memory-mapped on first use."""
        if code not in self._shards:
            self._shards[code] = ShardReader(self.root / self._shard_names[code])
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
