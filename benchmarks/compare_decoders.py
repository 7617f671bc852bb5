"""The GRU and the transformer decoder on one pipeline's cached features, same data and budget.

`python -m benchmarks.compare_decoders --project DIR --out results.json [-S train.key=value ...]`

DIR holds a pipeline's outputs up to `tokenize` (params.yaml, data/raw,
data/interim/captions.parquet, data/features, data/tokens). Each decoder is
trained with the train stage's own `fit_captioner` on params.yaml's train
section, `decoder` and the `-S` overrides changed and nothing else, then
scored on the evaluate split with the evaluate stage's own `evaluate_split`
(greedy and beam 3) and timed: training caption pairs/s (every step after the
first epoch, which compiles), decoding captions/s, and the in-process latency
of one image through `ImageCaptioner` (extractor included: what the served
model does per request, without HTTP). docs/transformer.md reports the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import yaml

from captioning.config import TrainParams, from_dict, load_section
from captioning.data.sources import source_scorer
from captioning.data.text import Vocabulary
from captioning.evaluation.evaluate import decode_images, evaluate_split
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner
from captioning.serving.inference import ImageCaptioner
from captioning.training.batches import CaptionSet
from captioning.training.fit import fit_captioner

QUALITY = ("BLEU-4", "CIDEr", "object_accuracy", "grounding", "grounding_chance", "mean_words")
LATENCY_REPEATS = 10


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step after the first epoch (the first compiles)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.epoch = 0
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch > 0:
            self.seconds.append(time.perf_counter() - self._start)


def train_one(project: Path, params: TrainParams, workdir: Path) -> tuple[Captioner, dict]:
    """Fit one decoder on the project's cached features; the model and its training figures."""
    store = FeatureStore(project / "data" / "features")
    tokens = project / "data" / "tokens"
    vocabulary = Vocabulary.from_json((tokens / "vocab.json").read_text())
    train, val = CaptionSet.load(tokens, "train"), CaptionSet.load(tokens, "val")
    table = pd.read_parquet(project / "data" / "interim" / "captions.parquet")
    val_rows = table[table["split"] == "val"]
    references = {int(i): list(g["caption"]) for i, g in val_rows.groupby("image_id")}
    extractor = json.loads((project / "data" / "features" / "extractor.json").read_text())
    timer = StepTimer()
    start = time.perf_counter()
    model, summary = fit_captioner(
        store, vocabulary, train, val, params, extractor,
        workdir / "checkpoints", workdir / "history.csv", callbacks=[timer],
        val_references=references, val_scorer=source_scorer(project / "data" / "raw"),
    )  # fmt: skip
    pairs_per_step = params.batch_size  # captions_per_image 0 or 1: one caption per row
    return model, {
        **summary,
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_pairs_per_s": round(pairs_per_step * len(timer.seconds) / sum(timer.seconds), 1),
        "parameters": int(model.count_params()),
        "decoder_parameters": int(model.decoder.count_params()),
    }


def score_and_time(project: Path, model: Captioner, method: str, beam_size: int) -> dict:
    """Quality on the evaluate split and captions/s of the timed second pass."""
    params = dataclasses.replace(
        load_section("evaluate", project / "params.yaml"), decoder=method, beam_size=beam_size
    )
    store = FeatureStore(project / "data" / "features")
    table = pd.read_parquet(project / "data" / "interim" / "captions.parquet")
    result = evaluate_split(model, store, table, params, source_scorer(project / "data" / "raw"))
    start = time.perf_counter()  # evaluate_split traced every batch shape already
    decode_images(model, store, result.image_ids, params)
    seconds = time.perf_counter() - start
    return {
        **{k: round(float(result.corpus[k]), 4) for k in QUALITY if k in result.corpus},
        "captions_per_s": round(len(result.image_ids) / seconds, 1),
    }


def one_image_latency(project: Path, model: Captioner) -> float:
    """Median milliseconds to caption one test image from its bytes, greedy."""
    table = pd.read_parquet(project / "data" / "interim" / "captions.parquet")
    path = table[table["split"] == "test"]["path"].iloc[0]
    data = Path(path).read_bytes()
    captioner = ImageCaptioner(model)
    captioner.caption_bytes([data])  # traces the extractor and the greedy loop
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        captioner.caption_bytes([data])
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 1)


def compare(project: Path, overrides: dict, decoders: list[str]) -> dict:
    """{decoder: figures} for each decoder, trained and scored on the same data."""
    base = load_section("train", project / "params.yaml")
    results = {}
    for decoder in decoders:
        params = from_dict(
            TrainParams, "train", {**dataclasses.asdict(base), **overrides, "decoder": decoder}
        )
        with tempfile.TemporaryDirectory() as workdir:
            model, figures = train_one(project, params, Path(workdir))
        figures["greedy"] = score_and_time(project, model, "greedy", 1)
        figures["beam 3"] = score_and_time(project, model, "beam", 3)
        figures["one_image_ms"] = one_image_latency(project, model)
        results[decoder] = figures
        print(json.dumps({decoder: figures}, indent=1), flush=True)
    return results


def parse_override(text: str) -> tuple[str, object]:
    """`train.key=value` -> (key, YAML-parsed value), as `dvc exp run -S` reads it."""
    dotted, _, value = text.partition("=")
    section, _, key = dotted.partition(".")
    if section != "train" or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected train.KEY=VALUE")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="pipeline folder (tokenized)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("-S", dest="overrides", action="append", type=parse_override, default=[])
    parser.add_argument("--decoders", nargs="+", default=["gru", "transformer"])
    args = parser.parse_args()
    out, project = args.out.resolve(), args.project.resolve()
    # The pipeline's files name each other relative to its root (the demo's
    # object boxes, for one), as the stages run them: run there too.
    os.chdir(project)
    results = compare(project, dict(args.overrides), args.decoders)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
