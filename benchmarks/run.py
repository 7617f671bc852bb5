"""Speed, memory and decoder benchmarks: `python -m benchmarks.run [--quick] [--only NAME]`.

Five benchmarks run by default, all measured in one run on one machine, each
printed with its target and PASS/FAIL, and written together to `reports/bench.json`:

- features: `extract_features` end to end (demo JPEGs on disk -> float16 store)
  against the bare InceptionV3 forward pass on an in-memory batch;
- store: bytes on disk per image of that store, index and manifest included;
- train: caption pairs/s of the project's compiled whole-sequence step
  (`Captioner.fit`) against the tutorial's Python loop over time steps;
- memory: peak RSS of extraction and of training, each in a child process, at
  two data set sizes (features are memory-mapped and batches streamed, so it
  should not grow with the data);
- decode: captions/s of batched greedy decoding against one image at a time.

A sixth, `--only decoders` (`make bench-decoders`), needs the pipeline's
outputs (`make repro`): it scores greedy, beam 3 and beam 5 on the evaluate
split with the evaluate stage's own `evaluate_split`, and times each decoder.

Timings on a shared machine are noisy: the load average is recorded with the
figures. `--quick` shrinks the data sizes (not the model) for a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from captioning.config import load_section
from captioning.data.demo import generate_demo
from captioning.data.sources import REF_NAME, demo_objects
from captioning.decode import CaptionDecoder
from captioning.evaluation import decode_images, evaluate_split, references_by_image
from captioning.features import (
    INDEX_FILE,
    SHARD_SUFFIX,
    FeatureStore,
    build_extractor,
    bytes_per_image,
    extract_features,
    write_shard,
)
from captioning.model import Captioner, ModelConfig, build_captioner, load_captioner
from captioning.text import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, Vocabulary
from captioning.training import CaptionSet, caption_batches

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BENCHMARKS = ("features", "store", "train", "memory", "decode")
BENCHMARKS = (*DEFAULT_BENCHMARKS, "decoders")  # decoders needs a trained model: --only decoders
IMAGE_SIZE = 299
FEATURE_BATCH = 32  # the features stage's batch size
TRAIN_BATCH = 64  # the train stage's batch size
TRAIN_CAPTIONS_PER_IMAGE = 5  # train.captions_per_image: image-major batches of 13 images x 5
CAPTION_TOKENS = 18  # <start> + up to 16 words + <end>: a long-ish COCO caption
DECODE_MAX_LEN = 20
DECODE_BATCHES = (64, 256)  # evaluate.batch_size's default, and a bigger one for comparison
LOCATIONS, CHANNELS = 64, 2048
FLOAT32_BYTES = LOCATIONS * CHANNELS * 4  # one image's features as float32: 524,288
CHILD_PREFIX = "BENCH_CHILD "
# What the decoders benchmark reads, relative to --project: where dvc.yaml's stages write it.
MODEL_FILE = "models/captioner.keras"
FEATURES_DIR = "data/features"
CAPTION_TABLE = "data/interim/captions.parquet"
RAW_DIR = "data/raw"
PARAMS_FILE = "params.yaml"
DECODERS = (("greedy", 1), ("beam", 3), ("beam", 5))  # (method, beam size)
QUALITY = (
    "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
    "object_accuracy", "grounding",
)  # fmt: skip


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


QUICK = Sizes(64, (64, 128), 32, (200, 800), 2, 2, False, 4, 1, 1, 24)
FULL = Sizes(192, (128, 512), 64, (200, 800), 6, 8, True, 18, 3, 4, None)


# ----------------------------------------------------------------------------- results


class Result:
    """Figures of one benchmark, the checks against its targets, and notes for the reader."""

    def __init__(self, title: str):
        self.title = title
        self.figures: dict[str, float | int | str] = {}
        self.units: dict[str, str] = {}
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.rows: list[dict] = []  # a table, for benchmarks that compare variants

    def add_row(self, row: dict) -> None:
        self.rows.append(row)

    def add(self, name: str, value, unit: str = "") -> None:
        self.figures[name] = value
        self.units[name] = unit

    def check(self, name: str, target: str, passed: bool) -> None:
        self.checks.append({"figure": name, "target": target, "pass": bool(passed)})

    def to_json(self) -> dict:
        out = {
            "title": self.title,
            "figures": self.figures,
            "units": self.units,
            "checks": self.checks,
            "notes": self.notes,
        }
        if self.rows:
            out["rows"] = self.rows
        return out

    def print(self) -> None:
        print(f"\n== {self.title}")
        targets = {c["figure"]: c for c in self.checks}
        for name, value in self.figures.items():
            line = f"  {name:<48} {_format(value):>14} {self.units[name]:<10}"
            if name in targets:
                verdict = "PASS" if targets[name]["pass"] else "FAIL"
                line += f" target {targets[name]['target']:<12} {verdict}"
            print(line.rstrip())
        if self.rows:
            columns = list(dict.fromkeys(key for row in self.rows for key in row))
            cells = [[_format(row.get(c, "n/a")) for c in columns] for row in self.rows]
            widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
            for line in (columns, *cells):
                print(
                    "  " + "  ".join(f"{text:>{w}}" for text, w in zip(line, widths, strict=True))
                )
        for note in self.notes:
            print(f"  note: {note}")
        sys.stdout.flush()


def _format(value) -> str:
    """Four significant figures for small floats, whole numbers with separators otherwise."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- fixtures


def _image_table(demo_root: Path, count: int) -> pd.DataFrame:
    """The first `count` demo train images as extract_features' input table."""
    paths = sorted((demo_root / "train2014").glob("*.jpg"))[:count]
    if len(paths) < count:
        raise RuntimeError(f"{demo_root}: {len(paths)} images, {count} needed")
    ids = [int(p.stem.rsplit("_", 1)[1]) for p in paths]
    return pd.DataFrame({"image_id": ids, "path": [str(p) for p in paths], "split": "train"})


def _vocabulary(size: int) -> Vocabulary:
    return Vocabulary([*SPECIAL_TOKENS, *(f"w{i}" for i in range(size - len(SPECIAL_TOKENS)))])


def _tutorial_model(vocab_size: int, seed: int = 0) -> Captioner:
    """The tutorial's sizes: embedding 256, units 512, attention 512, encoder 256 (the defaults)."""
    return build_captioner(ModelConfig(vocab_size=vocab_size), _vocabulary(vocab_size), seed=seed)


def _fake_tokens(rows: int, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, CAPTION_TOKENS) int32: <start> words <end> <pad>..., 12 to 18 tokens long."""
    lengths = rng.integers(12, CAPTION_TOKENS + 1, rows)
    lengths[0] = CAPTION_TOKENS  # a batch is cut to its longest caption; make that 18
    words = rng.integers(len(SPECIAL_TOKENS), vocab_size, (rows, CAPTION_TOKENS))
    position = np.arange(CAPTION_TOKENS)
    tokens = np.where((position >= 1) & (position < lengths[:, None] - 1), words, PAD_ID)
    tokens[:, 0] = START_ID
    tokens[np.arange(rows), lengths - 1] = END_ID
    return tokens.astype(np.int32)


def _write_fake_store(out: Path, count: int, shard_size: int = 256, seed: int = 0) -> None:
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
        array = np.maximum(rng.standard_normal((n, LOCATIONS, CHANNELS), dtype=np.float32), 0)
        write_shard(out / name, array.astype(np.float16))
        shards += [name] * n
        rows += range(n)
    index = pd.DataFrame(
        {"image_id": ids, "split": "train", "shard": shards, "row": np.array(rows, np.int64)}
    )
    index.to_parquet(out / INDEX_FILE, index=False)


class Workspace:
    """Temporary data shared by the benchmarks of one run: demo images, extractor, store.

    `pipeline` holds the paths of the pipeline outputs the decoders benchmark reads.
    """

    def __init__(
        self,
        root: Path,
        sizes: Sizes,
        vocab_size: int,
        demo_images: int,
        pipeline: dict[str, Path] | None = None,
    ):
        self.root = root
        self.pipeline = pipeline or {}
        self.sizes = sizes
        self.vocab_size = vocab_size
        self.demo_count = demo_images
        self.demo_root = root / "demo"
        self.store_dir: Path | None = None
        self._demo_ready = False
        self._extractor: keras.Model | None = None

    def images(self, count: int) -> pd.DataFrame:
        if not self._demo_ready:
            generate_demo(self.demo_root, self.demo_count, 0, seed=0)
            self._demo_ready = True
        return _image_table(self.demo_root, count)

    def extractor(self) -> keras.Model:
        if self._extractor is None:
            self._extractor = build_extractor("none", IMAGE_SIZE, seed=0)
        return self._extractor


# ----------------------------------------------------------------------------- 1. features


def bench_features(ws: Workspace) -> Result:
    n = ws.sizes.feature_images
    result = Result(
        f"features: extract_features on {n} demo JPEGs vs bare InceptionV3 "
        f"(batch {FEATURE_BATCH}, {IMAGE_SIZE} px, weights none)"
    )
    images = ws.images(n)
    extractor = ws.extractor()
    # Warm-ups: extract_features traces its forward pass once per model; one full
    # batch also gets the batch-32 kernels set up.
    extract_features(
        images.iloc[:FEATURE_BATCH], ws.root / "warmup-store", extractor,
        batch_size=FEATURE_BATCH, image_size=IMAGE_SIZE, progress=False,
    )  # fmt: skip
    spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)
    bare = tf.function(lambda x: extractor(x, training=False), input_signature=[spec])
    batch = tf.random.stateless_uniform((FEATURE_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), [0, 0], -1, 1)
    bare(batch).numpy()

    def bare_batches(count: int) -> float:
        return _seconds(lambda: [bare(batch).numpy() for _ in range(count)])

    # The bare pass is timed half before and half after the end-to-end run, so
    # a change in the machine's load over the run hits both about equally.
    batches = -(-n // FEATURE_BATCH)
    before, after = max(1, batches // 2), max(1, batches - batches // 2)
    bare_s = bare_batches(before)
    ws.store_dir = ws.root / "store"
    e2e_s = _seconds(
        lambda: extract_features(
            images,
            ws.store_dir,
            extractor,
            batch_size=FEATURE_BATCH,
            image_size=IMAGE_SIZE,
            progress=False,
        )  # fmt: skip
    )
    bare_s += bare_batches(after)

    e2e_rate = n / e2e_s
    bare_rate = (before + after) * FEATURE_BATCH / bare_s
    ratio = e2e_rate / bare_rate
    result.add("end-to-end extract_features", e2e_rate, "images/s")
    result.add("bare forward pass (tf.function)", bare_rate, "images/s")
    result.add("end-to-end / bare", ratio, "")
    result.check("end-to-end / bare", ">= 0.85", ratio >= 0.85)
    result.notes.append(
        "end to end = hashing the files, decoding and resizing the JPEGs (tf.data), "
        "the forward pass, float16 conversion and writing shards + index"
    )
    return result


# ----------------------------------------------------------------------------- 2. store


def bench_store(ws: Workspace) -> Result:
    if ws.store_dir is None:  # --only store: write one, untimed
        ws.store_dir = ws.root / "store"
        extract_features(
            ws.images(ws.sizes.feature_images), ws.store_dir, ws.extractor(),
            batch_size=FEATURE_BATCH, image_size=IMAGE_SIZE, progress=False,
        )  # fmt: skip
    store = FeatureStore(ws.store_dir)
    count = len(store)
    per_image = bytes_per_image(ws.store_dir)
    shards = sum(p.stat().st_size for p in ws.store_dir.glob(f"*{SHARD_SUFFIX}"))
    result = Result(f"store: bytes on disk per image ({count} images, one store)")
    result.add("bytes per image (all files)", per_image, "bytes")
    result.add("  of which shards", shards / count, "bytes")
    result.add("  of which index + manifest", per_image - shards / count, "bytes")
    result.add("share of float32 (524,288 bytes)", 100 * per_image / FLOAT32_BYTES, "%")
    result.check(
        "bytes per image (all files)", f"<= {FLOAT32_BYTES // 2:,}", per_image <= FLOAT32_BYTES / 2
    )
    result.notes.append(
        "shards keep float16 values losslessly: a bitmask of the nonzero values plus those "
        "values (InceptionV3's last block ends in ReLUs, about half of all values are zero)"
    )
    return result


# ----------------------------------------------------------------------------- 3. train


def tutorial_loss(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """The tutorial's loss_function: masked cross-entropy of one time step, averaged over the batch."""
    mask = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)  # (B,)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)  # (B,)
    return tf.reduce_mean(ce * mask)


def tutorial_word(decoder, tokens, features, hidden):
    """The tutorial's `RNN_Decoder.call(x, features, hidden)` on this model's layers.

    As the tutorial writes it: attention computes W1 features again for every
    word, and the GRU cell takes [context, embedding] concatenated. The state
    is carried (the tutorial's own GRU call drops it), so the maths equal the
    scan's.
    """
    context, weights = decoder.attention(features, hidden)  # W1 features + W2 hidden
    x = tf.concat([context, decoder.embedding(tokens)], axis=-1)  # (B, E + D)
    state, _ = decoder.gru(x, [hidden])
    return decoder.fc2(decoder.fc1(state)), state, weights


def _word_function(decoder, encoded, hoisted: bool) -> Callable:
    """(tokens, state) -> (logits, state, weights) for one word of the step loops.

    hoisted: `decoder.step` with the attention keys and the recurrence's loop
    weights computed once per sequence, as the scan does, so the Python loop is
    the only difference. Otherwise the tutorial's decoder call (`tutorial_word`).
    """
    if not hoisted:
        return lambda tokens, state: tutorial_word(decoder, tokens, encoded, state)
    projected = decoder.attention.project_features(encoded)  # (B, L, A)
    loop_weights = decoder.loop_weights()
    return lambda tokens, state: decoder.step(tokens, state, encoded, projected, loop_weights)


def loop_logits(model: Captioner, features, tokens, hoisted: bool) -> tf.Tensor:
    """Teacher forcing one word at a time: (B, T-1, V) logits."""
    encoded = model.encoder(features)  # (B, L, E)
    word = _word_function(model.decoder, encoded, hoisted)
    state = model.decoder.initial_state(encoded)  # (B, U)
    logits = []
    for i in range(1, tokens.shape[1]):
        step_logits, state, _ = word(tokens[:, i - 1], state)
        logits.append(step_logits)
    return tf.stack(logits, axis=1)


def loop_train_step(model: Captioner, optimizer, features, tokens, hoisted: bool) -> tf.Tensor:
    """The tutorial's train_step: a Python loop over time steps inside a GradientTape.

    The same layers and the same attention penalty as the compiled step; the
    per-word work is the tutorial's, or with `hoisted` the scan's.
    """
    with tf.GradientTape() as tape:
        encoded = model.encoder(features)  # (B, L, E)
        word = _word_function(model.decoder, encoded, hoisted)
        state = model.decoder.initial_state(encoded)  # (B, U)
        loss, weights = 0.0, []
        for i in range(1, tokens.shape[1]):
            logits, state, step_weights = word(tokens[:, i - 1], state)
            loss += tutorial_loss(tokens[:, i], logits)
            weights.append(step_weights)
        mask = tf.cast(tf.not_equal(tokens[:, 1:], PAD_ID), tf.float32)  # (B, T-1)
        coverage = tf.reduce_sum(tf.stack(weights, 1) * mask[..., None], axis=1)  # (B, L)
        loss += model.model_config.attention_penalty * tf.reduce_mean(tf.square(1.0 - coverage))
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    return loss


def tutorial_train_step(model: Captioner, optimizer, features, tokens) -> tf.Tensor:
    """The tutorial's loop as written: attention keys recomputed for every word."""
    return loop_train_step(model, optimizer, features, tokens, hoisted=False)


def hoisted_train_step(model: Captioner, optimizer, features, tokens) -> tf.Tensor:
    """The same loop with the per-sequence work done once, as the compiled scan does."""
    return loop_train_step(model, optimizer, features, tokens, hoisted=True)


class _BatchClock(keras.callbacks.Callback):
    """Records when each training batch ends."""

    def __init__(self):
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def bench_train(ws: Workspace) -> Result:
    sizes, vocab = ws.sizes, ws.vocab_size
    result = Result(
        f"train: caption pairs/s, batch {TRAIN_BATCH}, {CAPTION_TOKENS}-token captions, "
        f"tutorial sizes (emb 256, units 512, attention 512, encoder 256), vocab {vocab}"
    )
    rng = np.random.default_rng(0)
    count = sizes.train_batches + 1  # one more for warm-up
    data = [
        (
            rng.standard_normal((TRAIN_BATCH, LOCATIONS, CHANNELS), dtype=np.float32).astype(
                np.float16
            ),
            _fake_tokens(TRAIN_BATCH, vocab, rng),
        )
        for _ in range(count)
    ]
    model = _tutorial_model(vocab)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), jit_compile=True
    )  # as the train stage (train.jit_compile)

    # The one-step loop and the scan must compute the same thing, or the comparison is moot.
    features, tokens = data[0]
    scan_logits, _ = model((features, tokens[:, :-1]))
    for hoisted, name in ((False, "tutorial loop"), (True, "hoisted loop")):
        gap = tf.reduce_max(tf.abs(scan_logits - loop_logits(model, features, tokens, hoisted)))
        result.add(f"max |logit| gap, {name} vs scan", float(gap), "")

    # caption_batches' signature: shapes unknown, so the trace is the one training uses.
    signature = (
        tf.TensorSpec((None, LOCATIONS, CHANNELS), tf.float16),
        tf.TensorSpec((None, None), tf.int32),
    )

    def dataset(items):
        batches = tf.data.Dataset.from_generator(lambda: iter(items), output_signature=signature)
        # Prefetching, as the train stage's caption_batches does.
        return batches.apply(tf.data.experimental.assert_cardinality(len(items))).prefetch(2)

    # One fit over all batches, clocked from the end of the first (traced) batch to the
    # end of the last: fit's own set-up costs about half a second per call.
    clock = _BatchClock()
    model.fit(dataset(data), shuffle=False, verbose=0, callbacks=[clock])
    compiled_s = clock.ends[-1] - clock.ends[0]
    compiled = sizes.train_batches * TRAIN_BATCH / compiled_s

    # What the train stage runs: image-major batches (train.captions_per_image), the
    # encoder and attention keys once per image; round(64 / 5) = 13 images, 65 pairs.
    k = TRAIN_CAPTIONS_PER_IMAGE
    n_images = round(TRAIN_BATCH / k)
    grouped = [
        (f[:n_images], _fake_tokens(n_images * k, vocab, rng).reshape(n_images, k, -1))
        for f, _ in data
    ]
    grouped_signature = (signature[0], tf.TensorSpec((None, k, None), tf.int32))
    grouped_batches = (
        tf.data.Dataset.from_generator(lambda: iter(grouped), output_signature=grouped_signature)
        .apply(tf.data.experimental.assert_cardinality(len(grouped)))
        .prefetch(2)
    )
    clock = _BatchClock()
    # A fresh train function: Keras' reduce_retracing would otherwise relax the traced
    # token spec from (B, T) to unknown rank, and the model needs to see (n, K, T).
    model.make_train_function(force=True)
    model.fit(grouped_batches, shuffle=False, verbose=0, callbacks=[clock])
    image_major = sizes.train_batches * n_images * k / (clock.ends[-1] - clock.ends[0])

    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    def loop_rate(step) -> float:
        step(model, optimizer, *map(tf.convert_to_tensor, data[0])).numpy()  # warm-up / trace
        seconds = _seconds(
            lambda: [
                step(model, optimizer, *map(tf.convert_to_tensor, b)).numpy() for b in data[1:]
            ]
        )
        return sizes.train_batches * TRAIN_BATCH / seconds

    eager = loop_rate(tutorial_train_step)
    hoisted = loop_rate(hoisted_train_step)
    result.add("compiled whole-sequence step (fit)", compiled, "pairs/s")
    result.add(f"compiled, image-major ({n_images} images x {k} captions)", image_major, "pairs/s")
    result.add("tutorial loop, eager", eager, "pairs/s")
    result.add("hoisted loop, eager (keys + loop weights once per sequence)", hoisted, "pairs/s")
    result.add("compiled / eager tutorial loop", compiled / eager, "x")
    result.add("compiled image-major / eager tutorial loop", image_major / eager, "x")
    result.add(
        "compiled / eager hoisted loop (the loop the only difference)", compiled / hoisted, "x"
    )
    result.check("compiled / eager tutorial loop", ">= 5", compiled / eager >= 5)
    if sizes.train_unrolled:
        unrolled = loop_rate(tf.function(tutorial_train_step))
        result.add("tutorial loop, tf.function (unrolled)", unrolled, "pairs/s")
        result.add("compiled / tf.function tutorial loop", compiled / unrolled, "x")
    else:
        result.notes.append("--quick skips the tf.function-decorated tutorial loop")
    result.notes.append(f"{sizes.train_batches} timed batches per variant after one warm-up batch")
    return result


# ----------------------------------------------------------------------------- 4. memory


class _AnonPeak:
    """Samples this process's anonymous RSS (heap, not file-backed mmap pages) every 20 ms."""

    def __init__(self):
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child_main(kind: str, config: dict) -> None:
    """Run one memory workload in this (child) process and print its figures as JSON."""
    with _AnonPeak() as anon:
        if kind == "features":
            extract_features(
                _image_table(Path(config["demo_root"]), config["images"]), config["out"],
                build_extractor("none", IMAGE_SIZE, seed=0), batch_size=FEATURE_BATCH,
                shard_size=config["shard_size"], image_size=IMAGE_SIZE, progress=False,
            )  # fmt: skip
        elif kind == "train":
            store = FeatureStore(config["store"])
            ids = np.repeat(store.image_ids("train"), 5)  # five captions per image
            rng = np.random.default_rng(0)
            captions = CaptionSet(_fake_tokens(len(ids), config["vocab_size"], rng), ids)
            model = _tutorial_model(config["vocab_size"])
            model.encoder.set_feature_stats(*store.feature_stats("train"))  # as fit_captioner
            model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
            batches = caption_batches(store, captions, TRAIN_BATCH, seed=0).take(config["steps"])
            batches = batches.apply(tf.data.experimental.assert_cardinality(config["steps"]))
            model.fit(batches, shuffle=False, verbose=0)
        else:
            raise ValueError(f"unknown child workload {kind!r}")
    report = {"vm_hwm_kib": _status_kib("VmHWM"), "peak_anon_kib": anon.peak_kib}
    print(CHILD_PREFIX + json.dumps(report), flush=True)


def _run_child(kind: str, config: dict) -> dict:
    """Run child_main in a fresh interpreter and return the figures it reports about itself.

    The child reads its own VmHWM: the kernel's ru_maxrss of a child (os.wait4,
    RUSAGE_CHILDREN) is useless here, because exec keeps the high-water mark of
    the forked copy of this parent, which already holds InceptionV3 and more.
    """
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", kind, "--child-config"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    done = subprocess.run(
        [*cmd, json.dumps(config)], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{kind} memory child failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_PREFIX)]
    return json.loads(lines[-1][len(CHILD_PREFIX) :])


def bench_memory(ws: Workspace) -> Result:
    sizes = ws.sizes
    small, large = sizes.memory_images
    train_small, train_large = sizes.memory_train_images
    result = Result(
        f"memory: peak RSS in a child process (features {small} vs {large} images, "
        f"shard_size {sizes.memory_shard_size}; training {train_small} vs {train_large} images, "
        f"{sizes.memory_train_steps} steps of {TRAIN_BATCH}, vocab {ws.vocab_size})"
    )
    ws.images(large)  # make sure the demo images exist before the children read them
    runs = {}
    for count in (small, large):
        config = {
            "demo_root": str(ws.demo_root), "images": count, "out": str(ws.root / f"mem-features-{count}"),
            "shard_size": sizes.memory_shard_size,
        }  # fmt: skip
        runs[("features", count)] = _run_child("features", config)
    for count in (train_small, train_large):
        store = ws.root / f"mem-store-{count}"
        _write_fake_store(store, count)
        config = {
            "store": str(store),
            "steps": sizes.memory_train_steps,
            "vocab_size": ws.vocab_size,
        }
        runs[("train", count)] = _run_child("train", config)

    for kind, (lo, hi) in (("features", (small, large)), ("train", (train_small, train_large))):
        peak_lo, peak_hi = (runs[(kind, n)]["vm_hwm_kib"] / 1024 for n in (lo, hi))
        anon_lo, anon_hi = (runs[(kind, n)]["peak_anon_kib"] / 1024 for n in (lo, hi))
        growth = anon_hi / anon_lo - 1
        times = f"{hi / lo:g}x data"
        result.add(
            f"{kind}: peak RSS (VmHWM), {lo} / {hi} images",
            f"{peak_lo:,.0f} / {peak_hi:,.0f}",
            "MiB",
        )
        result.add(f"{kind}: peak RSS growth for {times}", peak_hi / peak_lo - 1, "")
        result.add(
            f"{kind}: peak anonymous RSS, {lo} / {hi} images",
            f"{anon_lo:,.0f} / {anon_hi:,.0f}",
            "MiB",
        )
        result.add(f"{kind}: peak anonymous RSS growth for {times}", growth, "")
        # What an in-memory design would add: the extra images' float16 features.
        extra = (hi - lo) * LOCATIONS * CHANNELS * 2 / 2**20
        result.add(f"{kind}: extra features if held in RAM", extra, "MiB")
        result.check(f"{kind}: peak anonymous RSS growth for {times}", "<= 0.10", growth <= 0.10)
    result.notes.append(
        "peak RSS = VmHWM of each child process: exact, but it also counts file-backed pages "
        "(shared libraries, and every memory-mapped feature page the process has touched, "
        "e.g. feature_stats reads the whole train split), which the kernel can drop at will; "
        "the target is on anonymous RSS (heap and tensors, sampled every 20 ms), the memory "
        "that cannot be given back"
    )
    result.notes.append(
        "repeated runs of one workload peak up to ~20% apart (glibc malloc arenas, "
        "TensorFlow's transient buffers), so a single FAIL near the target may be noise; "
        "--quick's 2x features sizes are a smoke test, the default's 4x the measurement"
    )
    return result


# ----------------------------------------------------------------------------- 5. decode


def eager_greedy(model: Captioner, features, max_len: int) -> np.ndarray:
    """The tutorial's evaluate(): one image, a Python loop over words, run eagerly."""
    decoder = model.decoder
    encoded = model.encoder(features)  # (1, L, E)
    projected = decoder.attention.project_features(encoded)
    state = decoder.initial_state(encoded)
    loop_weights = decoder.loop_weights()
    tokens, out = tf.fill([1], START_ID), []
    for _ in range(max_len):
        logits, state, _ = decoder.step(tokens, state, encoded, projected, loop_weights)
        tokens = tf.argmax(logits, axis=-1, output_type=tf.int32)  # (1,)
        out.append(int(tokens[0]))
        if out[-1] == END_ID:
            break
    return np.array(out)


def word_matmuls(model: Captioner, batch: int):
    """A compiled loop of only the matmuls of each word (W2, GRU, fc1, fc2) for `batch` rows.

    Returns run(words) -> seconds. What a batch can share on a CPU is these
    layers' weight reads; their arithmetic grows with the batch. So the time of
    the matmuls alone, per row, bounds how cheap a batched caption can get.
    """
    d, c = model.decoder, model.model_config
    state = tf.random.stateless_normal([batch, c.units], [0, 0])  # (B, U)
    x = tf.random.stateless_normal([batch, c.encoder_dim + c.embedding_dim], [0, 1])  # (B, E + D)

    @tf.function
    def words(state, n):
        for _ in tf.range(n):
            logits = d.fc2(d.fc1(state))  # (B, V)
            query = d.attention.W2(state)  # (B, A)
            _, [state] = d.gru(x, [state])  # (B, U)
            state += 0.0 * (logits[:, :1] + query[:, :1])  # keeps every matmul in the loop
        return state

    words(state, tf.constant(1)).numpy()  # trace
    return lambda n: _seconds(lambda: words(state, tf.constant(n)).numpy())


def bench_decode(ws: Workspace) -> Result:
    sizes, vocab = ws.sizes, ws.vocab_size
    small, big = DECODE_BATCHES
    result = Result(
        f"decode: greedy captions/s, max_len {DECODE_MAX_LEN}, tutorial sizes, vocab {vocab} "
        f"(batch {small} and {big} vs one image at a time, same CaptionDecoder)"
    )
    model = _tutorial_model(vocab)
    # An untrained model may pick <end> (or <pad>) at any step; forbidding those
    # makes every caption max_len words, so both ways do the same work per caption.
    bias = model.decoder.fc2.bias.numpy()
    bias[[PAD_ID, START_ID, END_ID]] = -1e9
    model.decoder.fc2.bias.assign(bias)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((big, LOCATIONS, CHANNELS), dtype=np.float32).astype(np.float16)
    decoder = CaptionDecoder(model)

    def batched(size: int):
        return decoder.decode(features[:size], "greedy", max_len=DECODE_MAX_LEN, batch_size=size)

    def single(count: int):
        return [
            decoder.decode(features[i : i + 1], "greedy", max_len=DECODE_MAX_LEN)
            for i in range(count)
        ]

    # Warm up every shape twice: reduce_retracing settles on a shape-general trace.
    for _ in range(2):
        lengths = batched(small).lengths
        batched(big)
        single(1)
    # Rounds alternate the ways, so a change in the machine's load hits all of them.
    matmuls = {size: word_matmuls(model, size) for size in DECODE_BATCHES}
    batched_s, matmuls_s = dict.fromkeys(DECODE_BATCHES, 0.0), dict.fromkeys(DECODE_BATCHES, 0.0)
    single_s = 0.0
    per_round = max(1, sizes.decode_single // sizes.decode_repeats)
    for _ in range(sizes.decode_repeats):
        for size in DECODE_BATCHES:
            batched_s[size] += _seconds(lambda size=size: batched(size))
            matmuls_s[size] += matmuls[size](DECODE_MAX_LEN)  # one batch of captions' worth
        single_s += _seconds(lambda: single(per_round))
    eager_greedy(model, features[:1], DECODE_MAX_LEN)
    eager_s = _seconds(
        lambda: [
            eager_greedy(model, features[i : i + 1], DECODE_MAX_LEN)
            for i in range(sizes.decode_eager)
        ]
    )

    rate = {size: sizes.decode_repeats * size / batched_s[size] for size in DECODE_BATCHES}
    single_rate = sizes.decode_repeats * per_round / single_s
    ratio = f"batched (batch {small}) / one at a time (per caption)"
    result.add("mean caption length (words)", float(np.mean(lengths)), "")
    for size in DECODE_BATCHES:
        result.add(f"batched greedy, batch {size}", rate[size], "captions/s")
    result.add("one image at a time", single_rate, "captions/s")
    result.add(ratio, rate[small] / single_rate, "x")
    result.add(f"batch {big} / batch {small}", rate[big] / rate[small], "x")
    for size in DECODE_BATCHES:  # if a batch did nothing but its matmuls, at the speed measured
        ceiling = sizes.decode_repeats * size / matmuls_s[size] / single_rate
        result.add(f"ceiling: batch {size} matmuls alone / one at a time", ceiling, "x")
    result.add("tutorial eager loop, one image", sizes.decode_eager / eager_s, "captions/s")
    result.add("batched / tutorial eager loop", rate[small] * eager_s / sizes.decode_eager, "x")
    result.check(ratio, ">= 20", rate[small] / single_rate >= 20)
    result.notes.append(
        f"{sizes.decode_repeats} rounds, each one call per batch size and the matmuls of its "
        f"{DECODE_MAX_LEN} words, and {per_round} single images, so a change in load hits all"
    )
    result.notes.append(
        "ceiling = the ratio if batched decoding were only its matmuls (W2, GRU, fc1, fc2; "
        "no attention, softmax or loop): on CPU a batch shares their weight reads, not their "
        "arithmetic, so where the ceiling is under the target that batch size cannot reach it"
    )
    return result


# ----------------------------------------------------------------------------- 6. decoders


def _decoder_inputs(project: Path, model: Path) -> dict[str, Path]:
    """The pipeline outputs the decoders benchmark reads; exits with what is missing."""
    paths = {
        "model": model,
        "features": project / FEATURES_DIR,
        "captions": project / CAPTION_TABLE,
        "raw": project / RAW_DIR,
        "params": project / PARAMS_FILE,
    }
    needed = [model, paths["features"] / INDEX_FILE, paths["captions"], paths["raw"] / REF_NAME]
    missing = [str(p) for p in (*needed, paths["params"]) if not p.exists()]
    if missing:
        raise SystemExit(
            f"decoders: {', '.join(missing)} not found. The benchmark scores the trained model "
            "on the pipeline's features: run `make repro` first (or pass --model / --project)."
        )
    return paths


def bench_decoders(ws: Workspace) -> Result:
    paths = ws.pipeline
    params = load_section("evaluate", paths["params"])
    table = pd.read_parquet(paths["captions"])
    image_ids = np.asarray(sorted(references_by_image(table, params.split)), dtype=np.int64)
    if ws.sizes.decoders_images is not None:  # --quick: the split's first images only
        image_ids = image_ids[: ws.sizes.decoders_images]
        table = table[(table["split"] != params.split) | table["image_id"].isin(image_ids)]
    model = load_captioner(str(paths["model"]))
    store = FeatureStore(paths["features"])
    objects = demo_objects(paths["raw"])
    result = Result(
        f"decoders: greedy vs beam 3 vs beam 5 on the {params.split} split "
        f"({len(image_ids)} images, max_len {params.max_len}, batch {params.batch_size}), "
        f"{paths['model']}"
    )
    decoder = CaptionDecoder(model)
    human: dict[str, float] = {}
    for method, beam_size in DECODERS:
        settings = dataclasses.replace(params, decoder=method, beam_size=beam_size)
        decode_images(model, store, image_ids, settings, decoder)  # warm-up: traces each shape
        start = time.perf_counter()
        timed = decode_images(model, store, image_ids, settings, decoder)
        decode_s = time.perf_counter() - start
        scored = evaluate_split(model, store, table, settings, objects)
        if scored.decoded.captions != timed.captions:
            raise RuntimeError(
                f"{method}: evaluate_split decoded other captions than the timed run"
            )
        name = method if method == "greedy" else f"{method} {beam_size}"
        row = {"decoder": name}
        row.update({metric: scored.corpus[metric] for metric in QUALITY if metric in scored.corpus})
        row["mean words"] = scored.corpus["mean_words"]
        row["captions/s"] = len(image_ids) / decode_s
        result.add_row(row)
        human = {k: v for k, v in scored.corpus.items() if k.startswith("human_")}
    result.add("images", len(image_ids), "")
    for name, value in human.items():
        result.add(f"one human reference vs the others: {name[len('human_') :]}", value, "")
    result.notes.append(
        "scores from evaluate_split, as the evaluate stage computes them (greedy matches "
        "reports/metrics.json for the same model and params); captions/s times decode_images "
        "alone (feature reads + decoding, after one warm-up pass), scoring excluded"
    )
    if objects is None:
        result.notes.append(
            "not the demo data set: no object truth, so no object_accuracy or grounding"
        )
    return result


# ----------------------------------------------------------------------------- driver


RUNNERS = {
    "features": bench_features,
    "store": bench_store,
    "train": bench_train,
    "memory": bench_memory,
    "decode": bench_decode,
    "decoders": bench_decoders,
}


def _machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(
                (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), ""
            )
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def _selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(DEFAULT_BENCHMARKS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return [n for n in BENCHMARKS if n in names]  # features before store: store reuses its output


def run(
    names: list[str],
    sizes: Sizes,
    vocab_size: int,
    quick: bool,
    pipeline: dict[str, Path] | None = None,
) -> dict:
    """Run the named benchmarks in order; return the JSON-ready report."""
    demo_images = max(
        sizes.feature_images if {"features", "store"} & set(names) else 0,
        sizes.memory_images[1] if "memory" in names else 0,
    )
    report = {
        "quick": quick,
        "vocab_size": vocab_size,
        "sizes": dataclasses.asdict(sizes),
        "machine": _machine(),
        "benchmarks": {},
    }
    print(
        f"machine: {report['machine']['cpu']} x {report['machine']['cpus']}; "
        f"load average at start {os.getloadavg()[0]:.2f} (timings on a busy machine are noisy)"
    )
    with tempfile.TemporaryDirectory(prefix="captioning-bench-") as tmp:
        ws = Workspace(Path(tmp), sizes, vocab_size, demo_images, pipeline)
        for name in names:
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            result = RUNNERS[name](ws)
            entry = result.to_json()
            entry["wall_s"] = round(time.perf_counter() - started, 1)
            entry["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            result.notes.append(
                f"took {entry['wall_s']} s; 1-min load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
            )
            entry["notes"] = result.notes
            result.print()
            report["benchmarks"][name] = entry
    return report


def _summary(report: dict) -> None:
    rows = [
        (name, check["figure"], _format(entry["figures"][check["figure"]]), check)
        for name, entry in report["benchmarks"].items()
        for check in entry["checks"]
    ]
    width = max((len(figure) for _, figure, _, _ in rows), default=0)
    print("\n== summary")
    for name, figure, text, check in rows:
        verdict = "PASS" if check["pass"] else "FAIL"
        print(f"  {name:<9} {figure:<{width}} {text:>10}  target {check['target']:<11} {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small data sizes: a ~2 minute smoke run"
    )
    parser.add_argument(
        "--only", action="append", metavar="NAME",
        help=f"run only these benchmarks (repeat or comma-separate): {', '.join(BENCHMARKS)}; "
        f"the default runs {', '.join(DEFAULT_BENCHMARKS)}",
    )  # fmt: skip
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "reports" / "bench.json",
        help="where to write the JSON",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=5004,
        help="vocabulary size of the train/decode models (5004 = the tutorial's 5000 + 4 specials; "
        "the demo data set has about 70)",
    )  # fmt: skip
    parser.add_argument(
        "--project", type=Path, default=REPO_ROOT,
        help=f"decoders: the pipeline folder whose {PARAMS_FILE}, {FEATURES_DIR}/, "
        f"{CAPTION_TABLE} and {RAW_DIR}/ are read (default: this repository)",
    )  # fmt: skip
    parser.add_argument(
        "--model", type=Path, default=None,
        help=f"decoders: the .keras captioner to score (default: PROJECT/{MODEL_FILE})",
    )  # fmt: skip
    parser.add_argument("--child", choices=("features", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child_main(args.child, json.loads(args.child_config))
        return
    if args.vocab_size <= len(SPECIAL_TOKENS):
        parser.error(f"--vocab-size must be more than {len(SPECIAL_TOKENS)}")
    names = _selected(args.only)
    pipeline = None
    if "decoders" in names:  # check before any benchmark runs, not after the others
        pipeline = _decoder_inputs(args.project, args.model or args.project / MODEL_FILE)
    sizes = QUICK if args.quick else FULL
    report = run(names, sizes, args.vocab_size, args.quick, pipeline)
    _summary(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
