"""What the benchmarks share: sizes per mode, the project defaults, fake data and one workspace.

`Sizes` says how much each benchmark runs: `FULL` measures, `QUICK` shrinks
the data (not the model) for a short run, `SMOKE` shrinks everything (75 px
images, tiny widths, a small vocabulary) so a test runs every benchmark end
to end in seconds: its figures are real but mean nothing. Batch, image and
model sizes default to the project's own, read from `captioning.config`, so a
benchmark measures what the pipeline runs. `Workspace` holds what one run
shares: options, demo images, the extractor, the feature store, and for
--smoke one tiny pipeline folder (data through a trained model, laid out as
dvc.yaml's stages write it) that the pipeline benchmarks read.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
import yaml

from benchmarks.flops import PEAK_SIZE, peak_gflops
from captioning.config import EvaluateParams, FeaturesParams, TokenizeParams, TrainParams
from captioning.data.demo import generate_demo
from captioning.data.text import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, Vocabulary
from captioning.features import (
    INDEX_FILE,
    SHARD_SUFFIX,
    build_extractor,
    extract_features,
    weights_digest,
    write_shard,
)
from captioning.model.captioner import Captioner, ModelConfig, build_captioner

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_REPORT = REPO_ROOT / "reports" / "bench.json"
# Pipeline outputs, relative to a project folder: where dvc.yaml's stages write them.
MODEL_FILE = "models/captioner.keras"
FEATURES_DIR = "data/features"
CAPTION_TABLE = "data/interim/captions.parquet"
TOKENS_DIR = "data/tokens"
RAW_DIR = "data/raw"
PARAMS_FILE = "params.yaml"

# Random weights whatever the features stage uses: the forward pass costs the same,
# and a benchmark downloads nothing.
EXTRACTOR_WEIGHTS = "none"
EXTRACTOR_SEED = FeaturesParams().seed
# The tokenize stage's vocabulary plus <pad> <start> <end> <unk>: 5004 with the tutorial's 5000.
VOCAB_SIZE = TokenizeParams().vocab_size + len(SPECIAL_TOKENS)
LOCATIONS, CHANNELS = ModelConfig.num_locations, ModelConfig.feature_dim  # InceptionV3's 8x8x2048
CAPTION_TOKENS = 18  # <start> + up to 16 words + <end>: a long-ish COCO caption
CAPTIONS_PER_IMAGE = 5  # as COCO and the demo set have; image-major batches group them
TINY_MODEL = {"embedding_dim": 16, "units": 32, "attention_units": 32, "encoder_dim": 16}
SMALL_IMAGE = 75  # InceptionV3's smallest input: a 1x1 grid of features


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much data, how many repeats, and (for --smoke only) how big a model each benchmark uses."""

    feature_images: int  # two batches at least, or nothing overlaps decoding with the forward pass
    # Extraction peak RSS, small vs large: the small one must be past the start-up ramp
    # (measured, peak anonymous MiB by images: 32: 742, 64: 915, 128: 978, 256: 1,025,
    # 512: 1,008), so the measurement compares 128 with 512.
    memory_images: tuple[int, int]
    memory_shard_size: int  # so both sizes span several shards
    memory_train_images: tuple[int, int]  # fake stores for training peak RSS
    memory_train_steps: int
    train_batches: int  # timed batches per training variant
    train_unrolled: bool  # also time the tutorial step under tf.function
    decode_single: int  # images decoded one at a time, over the rounds
    decode_repeats: int
    decode_eager: int  # images through the tutorial's eager loop
    decoders_images: int | None  # first images of the evaluate split; None: all
    peak_matmul: int  # 2048 reaches the same GFLOP/s on a CPU as 4096 in an eighth of the time
    image_size: int = FeaturesParams().image_size
    feature_batch: int = FeaturesParams().batch_size
    train_batch: int = TrainParams().batch_size
    vocab_size: int = VOCAB_SIZE
    decode_batches: tuple[int, int] = (EvaluateParams().batch_size, 256)
    model: dict = dataclasses.field(default_factory=dict)  # ModelConfig overrides
    jit_compile: bool = TrainParams().jit_compile  # XLA: slower than two steps of a tiny model
    matmul_s: float = 0.5  # seconds per timed try of a matmul shape (the peak: twice that)
    steps: int | None = None  # distributed: steps and global batch instead of the flags'
    global_batch: int | None = None


FULL = Sizes(192, (128, 512), 64, (200, 800), 6, 8, True, 18, 3, 4, None, PEAK_SIZE)
QUICK = Sizes(64, (64, 128), 32, (200, 800), 2, 2, False, 4, 1, 1, 24, 2048, steps=4,
              global_batch=16)  # fmt: skip
# A GPU runs these in seconds: more images and batches, fewer slow one-at-a-time repeats.
GPU_SIZES = dataclasses.replace(
    FULL, feature_images=1024, train_batches=40, train_unrolled=False,
    decode_single=16, decode_repeats=3, decode_eager=2, peak_matmul=8192,
)  # fmt: skip
SMOKE = Sizes(
    feature_images=16, memory_images=(8, 16), memory_shard_size=8, memory_train_images=(32, 64),
    memory_train_steps=2, train_batches=2, train_unrolled=False, decode_single=2,
    decode_repeats=1, decode_eager=1, decoders_images=8, peak_matmul=256,
    image_size=SMALL_IMAGE, feature_batch=8, train_batch=8, vocab_size=60,
    decode_batches=(4, 8), model=TINY_MODEL, jit_compile=False, matmul_s=0.01, steps=3, global_batch=8,
)  # fmt: skip
# A pipeline in a minute or two, as tests/pipeline_fixtures.py's TINY_PARAMS; --smoke's
# also at 75 px. convergence runs it under DVC, Workspace.pipeline by the stages' functions.
TINY_PARAMS = {
    "data": {"demo_val_images": 12},
    "features": {"batch_size": 8, "shard_size": 16},
    "train": {"budget_pairs": 32, "epoch_pairs": 16, "batch_size": 16, **TINY_MODEL},
    "evaluate": {"batch_size": 8},
}  # fmt: skip
TINY_TRAIN = {  # two epochs of one step (architectures times the second), tiny widths
    "budget_pairs": 16, "epoch_pairs": 8, "batch_size": 8, "val_sample_images": 4,
    "units": 16, "attention_units": 16, "embedding_dim": 16, "encoder_dim": 16,
    "transformer_layers": 1, "transformer_heads": 2, "transformer_width": 16, "transformer_ff": 16,
    "jit_compile": False,  # XLA's compile per model costs more than two steps of a tiny one
}  # fmt: skip
SMOKE_PARAMS = {
    "data": {"demo_train_images": 8, "demo_val_images": 8},
    "features": {**TINY_PARAMS["features"], "image_size": SMALL_IMAGE},
    "train": TINY_TRAIN,
    "evaluate": {"batch_size": 8, "max_len": 12},
}


def merged_params(base: dict, changes: dict[str, dict]) -> dict:
    """params.yaml's mapping with some keys of some sections changed."""
    return {**base, **{s: {**base.get(s, {}), **values} for s, values in changes.items()}}


# ----------------------------------------------------------------------------- models and data


def tutorial_model(vocab_size: int, seed: int = 0, **config) -> Captioner:
    """A captioner of ModelConfig's default sizes (the tutorial's) over a made-up vocabulary."""
    words = (f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))
    vocabulary = Vocabulary([*SPECIAL_TOKENS, *words])
    return build_captioner(ModelConfig(vocab_size=vocab_size, **config), vocabulary, seed=seed)


def compile_for_training(model: Captioner, sizes: Sizes) -> None:
    """Adam at the train stage's learning rate, XLA as train.jit_compile (or --smoke) says."""
    optimizer = keras.optimizers.Adam(TrainParams().learning_rate)
    model.compile(optimizer=optimizer, jit_compile=sizes.jit_compile)


def new_extractor(image_size: int) -> keras.Model:
    return build_extractor(EXTRACTOR_WEIGHTS, image_size, seed=EXTRACTOR_SEED)


def extract(
    images: pd.DataFrame, out: Path, extractor, sizes: Sizes, shard_size: int | None = None
) -> None:
    """`extract_features` at the run's batch and image size, silently."""
    extract_features(
        images, out, extractor, batch_size=sizes.feature_batch,
        shard_size=shard_size or FeaturesParams().shard_size, image_size=sizes.image_size,
        progress=False,
    )  # fmt: skip


def servable_model(path: Path, vocab_size: int, image_size: int, **config) -> Path:
    """An untrained captioner over its own extractor (random weights) saved as `path` (.keras)."""
    from captioning.training.checkpoints import save_model

    extractor = new_extractor(image_size)
    locations, channels = extractor.output.shape[1:]
    model = tutorial_model(
        vocab_size, num_locations=locations, feature_dim=channels, image_size=image_size,
        extractor_digest=weights_digest(extractor), **config,
    )  # fmt: skip
    save_model(model, path)
    return path


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
    """A feature store in extract_features' format with random ReLU-like content.

    Training memory and speed depend on sizes only, so this skips InceptionV3.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(999_999, size=count, replace=False) + 1)
    shards, rows = [], []
    for number, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        name = f"train-{number:05d}{SHARD_SUFFIX}"
        write_shard(out / name, np.maximum(fake_features(rng, n), 0))  # about half zeros
        shards += [name] * n
        rows += range(n)
    index = pd.DataFrame(
        {"image_id": ids, "split": "train", "shard": shards, "row": np.array(rows, np.int64)}
    )
    index.to_parquet(out / INDEX_FILE, index=False)


# ----------------------------------------------------------------------------- workspace


class Workspace:
    """What the benchmarks of one run share: options, sizes, demo images, extractor, store."""

    def __init__(self, root: Path, sizes: Sizes, options: argparse.Namespace):
        self.root, self.sizes, self.options = root, sizes, options
        self.quick = options.quick or options.smoke
        self.smoke = options.smoke
        self.vocab_size = options.vocab_size or sizes.vocab_size
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
            self._extractor = new_extractor(self.sizes.image_size)
        return self._extractor

    def extract(self, images: pd.DataFrame, out: Path) -> None:
        extract(images, out, self.extractor(), self.sizes)

    def model(self, **config) -> Captioner:
        """An untrained captioner of this run's sizes and vocabulary."""
        return tutorial_model(self.vocab_size, **{**self.sizes.model, **config})

    def peak_gflops(self, dtype=None) -> float:
        """The machine's matmul peak (float32 unless `dtype`), measured now.

        Each benchmark measures it beside its own rates: on a shared machine
        the load changes over a run, and a share is only fair at one load.
        """
        return peak_gflops(self.sizes.peak_matmul, dtype or tf.float32, 2 * self.sizes.matmul_s)

    def default_results(self, name: str) -> Path:
        """Where a benchmark with a results file writes it: reports/, or this workspace if quick."""
        return self.root / f"{name}.json" if self.quick else REPO_ROOT / "reports" / f"{name}.json"

    def pyfunc_model(self, name: str, image_size: int | None = None, serving=None, **config):
        """An untrained servable captioner under the workspace: (.keras file, pyfunc folder).

        Of this run's sizes, or `image_size` and `config`; `serving` a ServingConfig.
        """
        import mlflow

        from captioning.serving.pyfunc import ServingConfig, captioner_model_kwargs

        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        keras_path = servable_model(
            folder / "captioner.keras", self.vocab_size, image_size or self.sizes.image_size,
            **{**self.sizes.model, **config},
        )  # fmt: skip
        kwargs = captioner_model_kwargs(keras_path, serving or ServingConfig())
        mlflow.pyfunc.save_model(folder / "pyfunc", **kwargs)
        return keras_path, folder / "pyfunc"

    def project(self) -> Path:
        """The pipeline folder the pipeline benchmarks read: --project, or --smoke's own."""
        if self.options.project is not None:
            return self.options.project.resolve()
        return self.pipeline() if self.smoke else REPO_ROOT

    def pipeline(self) -> Path:
        """A tiny pipeline (SMOKE_PARAMS) through a trained model, by the stages' own functions."""
        from benchmarks.selection_data import Prepared, prepare, train_model
        from captioning.config import from_dict, read_params
        from captioning.training.checkpoints import save_model

        root = self.root / "pipeline"
        if (root / MODEL_FILE).exists():
            return root
        params = merged_params(read_params(REPO_ROOT / PARAMS_FILE), SMOKE_PARAMS)
        root.mkdir(parents=True)
        (root / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False))
        data = prepare(root, params["data"], params, {}, Prepared.pipeline(root))
        train = from_dict(TrainParams, "train", params["train"])
        model, _ = train_model(data, train, root / "models")
        save_model(model, root / MODEL_FILE)
        return root
