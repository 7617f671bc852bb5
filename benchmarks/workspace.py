"""What the benchmarks share: data sizes, the project defaults they run at, and a workspace.

`Sizes` says how much data each benchmark uses (`QUICK` for a smoke run,
`FULL` for the measurement). Batch, image and model sizes are the project's
own defaults, read from the `captioning.config` and `captioning.model.captioner`
dataclasses, so a benchmark measures what the pipeline runs. The paths of the
pipeline outputs the decoders benchmarks read live here too, in one place.
`Workspace` holds what one run shares between benchmarks (the command-line
options, demo images, the extractor, the feature store, the machine's peak
GFLOP/s, measured); the
fake-data writers make tokens, features and stores of the right shapes
without running the pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from benchmarks.flops import PEAK_SIZE, peak_gflops
from captioning.config import EvaluateParams, FeaturesParams, TokenizeParams, TrainParams
from captioning.data.demo import generate_demo
from captioning.data.text import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, Vocabulary
from captioning.features import (
    INDEX_FILE,
    SHARD_SUFFIX,
    build_extractor,
    extract_features,
    write_shard,
)
from captioning.model.captioner import Captioner, ModelConfig, build_captioner

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORTS = REPO_ROOT / "reports"
BENCH_REPORT = REPORTS / "bench.json"
# What the decoders benchmarks read, relative to --project: where dvc.yaml's stages write it.
MODEL_FILE = "models/captioner.keras"
FEATURES_DIR = "data/features"
CAPTION_TABLE = "data/interim/captions.parquet"
RAW_DIR = "data/raw"
PARAMS_FILE = "params.yaml"

IMAGE_SIZE = FeaturesParams().image_size
FEATURE_BATCH = FeaturesParams().batch_size
SHARD_SIZE = FeaturesParams().shard_size
EXTRACTOR_SEED = FeaturesParams().seed
# Random weights whatever the features stage uses: the forward pass costs the same,
# and a benchmark downloads nothing.
EXTRACTOR_WEIGHTS = "none"
TRAIN_BATCH = TrainParams().batch_size
EVALUATE_BATCH = EvaluateParams().batch_size
# The tokenize stage's vocabulary plus <pad> <start> <end> <unk>: 5004 with the tutorial's 5000.
VOCAB_SIZE = TokenizeParams().vocab_size + len(SPECIAL_TOKENS)
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
LOCATIONS = _MODEL_DEFAULTS["num_locations"]  # InceptionV3's 8 x 8 feature map
CHANNELS = _MODEL_DEFAULTS["feature_dim"]
CAPTION_TOKENS = 18  # <start> + up to 16 words + <end>: a long-ish COCO caption
CAPTIONS_PER_IMAGE = 5  # as COCO and the demo set have; image-major batches group them


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much data each benchmark uses; the model sizes are the tutorial's in both modes."""

    # Images through extract_features and the bare forward pass: two batches at least, or
    # nothing overlaps JPEG decoding with the forward pass and end to end looks worse.
    feature_images: int
    # Small and large data set for extraction peak RSS. The small one must be past the
    # start-up ramp, or the ratio shows the ramp, not growth. Measured, peak anonymous
    # RSS by images (batches of 32): 32: 742 MiB, 64: 915, 128: 978, 256: 1,025,
    # 512: 1,008 (likely tf.data preparing the next batch while InceptionV3 runs on
    # this one, and the allocator's arenas filling); so the default compares 128 with
    # 512, and --quick's 64 vs 128 is a smoke test that still sees the ramp.
    memory_images: tuple[int, int]
    memory_shard_size: int  # so both sizes span several shards
    memory_train_images: tuple[int, int]  # small and large fake store for training peak RSS
    memory_train_steps: int  # training steps in each memory child, whatever the data size
    train_batches: int  # timed batches per training variant
    train_unrolled: bool  # also time the tutorial step decorated with tf.function
    decode_single: int  # images decoded one at a time, spread over the rounds
    decode_repeats: int  # timing rounds: one batched call of each size + single images
    decode_eager: int  # images decoded by the tutorial's eager Python loop
    decoders_images: int | None  # first images of the evaluate split; None = all of them
    # Side of the float32 matmuls that measure the machine's peak; 2048 reaches the
    # same GFLOP/s on a CPU as 4096 in an eighth of the time.
    peak_matmul: int


QUICK = Sizes(64, (64, 128), 32, (200, 800), 2, 2, False, 4, 1, 1, 24, 2048)
FULL = Sizes(192, (128, 512), 64, (200, 800), 6, 8, True, 18, 3, 4, None, PEAK_SIZE)
# A GPU runs these in seconds: more images and batches than the CPU run, fewer
# repeats of the slow one-at-a-time baselines, bigger matmuls for the peak.
GPU_SIZES = dataclasses.replace(
    FULL, feature_images=1024, train_batches=40, train_unrolled=False,
    decode_single=16, decode_repeats=3, decode_eager=2, peak_matmul=8192,
)  # fmt: skip


# ----------------------------------------------------------------------------- models


def tutorial_model(vocab_size: int, seed: int = 0, **config) -> Captioner:
    """A captioner of ModelConfig's default sizes, the tutorial's, over a made-up vocabulary."""
    words = (f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))
    vocabulary = Vocabulary([*SPECIAL_TOKENS, *words])
    return build_captioner(ModelConfig(vocab_size=vocab_size, **config), vocabulary, seed=seed)


def model_sizes() -> str:
    """The tutorial model's sizes as benchmark titles print them."""
    d = _MODEL_DEFAULTS
    return (
        f"emb {d['embedding_dim']}, units {d['units']}, attention {d['attention_units']}, "
        f"encoder {d['encoder_dim']}"
    )


def compile_for_training(model: Captioner) -> None:
    """Adam at the train stage's learning rate, XLA as train.jit_compile says."""
    params = TrainParams()
    model.compile(
        optimizer=keras.optimizers.Adam(params.learning_rate), jit_compile=params.jit_compile
    )


def new_extractor() -> keras.Model:
    return build_extractor(EXTRACTOR_WEIGHTS, IMAGE_SIZE, seed=EXTRACTOR_SEED)


def extract(
    images: pd.DataFrame, out: Path, extractor: keras.Model, shard_size: int = SHARD_SIZE
) -> None:
    """`extract_features` at the features stage's batch and image size, silently."""
    extract_features(
        images, out, extractor, batch_size=FEATURE_BATCH, shard_size=shard_size,
        image_size=IMAGE_SIZE, progress=False,
    )  # fmt: skip


# ----------------------------------------------------------------------------- fake data


def image_table(demo_root: Path, count: int) -> pd.DataFrame:
    """The first `count` demo train images as extract_features' input table."""
    paths = sorted((demo_root / "train2014").glob("*.jpg"))[:count]
    if len(paths) < count:
        raise RuntimeError(f"{demo_root}: {len(paths)} images, {count} needed")
    ids = [int(p.stem.rsplit("_", 1)[1]) for p in paths]
    return pd.DataFrame({"image_id": ids, "path": [str(p) for p in paths], "split": "train"})


def fake_features(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, LOCATIONS, CHANNELS) float16 standard normal values."""
    return rng.standard_normal((count, LOCATIONS, CHANNELS), dtype=np.float32).astype(np.float16)


def fake_tokens(rows: int, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, CAPTION_TOKENS) int32: <start> words <end> <pad>..., 12 to 18 tokens long."""
    lengths = rng.integers(12, CAPTION_TOKENS + 1, rows)
    lengths[0] = CAPTION_TOKENS  # a batch is cut to its longest caption; make that 18
    words = rng.integers(len(SPECIAL_TOKENS), vocab_size, (rows, CAPTION_TOKENS))
    position = np.arange(CAPTION_TOKENS)
    tokens = np.where((position >= 1) & (position < lengths[:, None] - 1), words, PAD_ID)
    tokens[:, 0] = START_ID
    tokens[np.arange(rows), lengths - 1] = END_ID
    return tokens.astype(np.int32)


def write_fake_store(out: Path, count: int, shard_size: int = 256, seed: int = 0) -> None:
    """A feature store in extract_features' format (float16 shards + index), random content.

    Training memory depends on sizes only, so this skips the slow InceptionV3 pass.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(999_999, size=count, replace=False) + 1)
    shards, rows = [], []
    for number, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        name = f"train-{number:05d}{SHARD_SUFFIX}"
        # ReLU outputs, like InceptionV3's: about half the values are zero.
        write_shard(out / name, np.maximum(fake_features(rng, n), 0))
        shards += [name] * n
        rows += range(n)
    index = pd.DataFrame(
        {"image_id": ids, "split": "train", "shard": shards, "row": np.array(rows, np.int64)}
    )
    index.to_parquet(out / INDEX_FILE, index=False)


# ----------------------------------------------------------------------------- workspace


class Workspace:
    """What the benchmarks of one run share: options, demo images, extractor, feature store."""

    def __init__(self, root: Path, sizes: Sizes, options: argparse.Namespace):
        self.root = root
        self.sizes = sizes
        self.options = options
        self.quick = options.quick
        self.vocab_size = options.vocab_size
        self.demo_root = root / "demo"
        self.store_dir: Path | None = None
        self._demo_count = 0
        self._extractor: keras.Model | None = None

    def images(self, count: int) -> pd.DataFrame:
        """The first `count` demo train images (generated once, again if more are asked for)."""
        if count > self._demo_count:
            generate_demo(self.demo_root, count, 0, seed=0)
            self._demo_count = count
        return image_table(self.demo_root, count)

    def extractor(self) -> keras.Model:
        if self._extractor is None:
            self._extractor = new_extractor()
        return self._extractor

    def peak_gflops(self, dtype=None) -> float:
        """The machine's matmul peak (float32 unless `dtype`), measured now.

        Each benchmark measures it beside its own rates: on a shared machine
        the load changes over a run, and a share is only fair at one load.
        """
        return peak_gflops(self.sizes.peak_matmul, *(() if dtype is None else (dtype,)))
