"""Decoders on a real pipeline's outputs: greedy vs beam search, and GRU vs transformer.

Both read a pipeline folder (`--project`, this repository by default) and
score with the evaluate stage's own `evaluate_split` on its evaluate split,
timing `decode_images` alone (feature reads + decoding, after a warm-up pass).
`bench_decoders` (`make bench-decoders`, after `make repro`) scores the trained
model (`--model`, default models/captioner.keras) with greedy, beam 3 and beam
5. `bench_architectures` trains each `--decoders` architecture with the train
stage's own `fit_captioner` on the folder's tokenized data (params.yaml's train
section, `decoder` and the `-S` overrides changed, nothing else) and reports
its training pairs/s (steps after the first epoch, which compiles), greedy and
beam 3 scores and speed, and the in-process latency of one image through
`ImageCaptioner` (extractor included: what the served model does per request,
without HTTP). docs/transformer.md reports the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks.harness import BatchClock, Result, Timing, seconds, timed
from benchmarks.workspace import CAPTION_TABLE, FEATURES_DIR, MODEL_FILE, PARAMS_FILE, RAW_DIR
from captioning.config import TrainParams, from_dict, load_section
from captioning.data.sources import REF_NAME, source_scorer
from captioning.data.text import Vocabulary
from captioning.evaluation.evaluate import decode_images, evaluate_split, references_by_image
from captioning.features import INDEX_FILE, FeatureStore
from captioning.model.captioner import load_captioner
from captioning.model.decode import CaptionDecoder
from captioning.serving.inference import ImageCaptioner
from captioning.training.batches import CaptionSet
from captioning.training.fit import fit_captioner

DECODERS = (("greedy", 1), ("beam", 3), ("beam", 5))  # (method, beam size)
QUALITY = (
    "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
    "object_accuracy", "grounding", "grounding_chance",
)  # fmt: skip
TOKENS_DIR = "data/tokens"
LATENCY_REPEATS = 10


def decoder_inputs(project: Path, model: Path | None) -> dict[str, Path]:
    """The pipeline outputs the decoders benchmark reads; exits with what is missing."""
    paths = {
        "model": model or project / MODEL_FILE,
        "features": project / FEATURES_DIR,
        "captions": project / CAPTION_TABLE,
        "raw": project / RAW_DIR,
        "params": project / PARAMS_FILE,
    }
    needed = [paths["model"], paths["features"] / INDEX_FILE, paths["captions"]]
    missing = [
        str(p) for p in (*needed, paths["raw"] / REF_NAME, paths["params"]) if not p.exists()
    ]
    if missing:
        raise SystemExit(
            f"decoders: {', '.join(missing)} not found. The benchmark scores the trained model "
            "on the pipeline's features: run `make repro` first (or pass --model / --project)."
        )
    return paths


def score_and_time(model, paths, table, settings, limit: int | None, decoder=None) -> dict:
    """One decoder's row: evaluate_split's scores, mean words and captions/s of decode_images."""
    store, objects = FeatureStore(paths["features"]), source_scorer(paths["raw"])
    if limit is not None:  # --quick: the split's first images only
        ids = sorted(references_by_image(table, settings.split))[:limit]
        table = table[(table["split"] != settings.split) | table["image_id"].isin(ids)]
    scored = evaluate_split(model, store, table, settings, objects)  # also traces every shape
    ids = scored.image_ids
    decode_s = seconds(lambda: decode_images(model, store, ids, settings, decoder))
    name = "greedy" if settings.decoder == "greedy" else f"{settings.decoder} {settings.beam_size}"
    row = {"decoder": name, **{m: scored.corpus[m] for m in QUALITY if m in scored.corpus}}
    row["mean words"] = scored.corpus["mean_words"]
    row["captions/s"] = len(ids) / decode_s
    row["images"] = len(ids)
    row.update({k: v for k, v in scored.corpus.items() if k.startswith("human_")})
    return row


def bench_decoders(ws) -> Result:
    paths = decoder_inputs(ws.options.project, ws.options.model)
    params = load_section("evaluate", paths["params"])
    table = pd.read_parquet(paths["captions"])
    model = load_captioner(str(paths["model"]))
    decoder = CaptionDecoder(model)
    result = Result(
        f"decoders: greedy vs beam 3 vs beam 5 on the {params.split} split "
        f"(max_len {params.max_len}, batch {params.batch_size}), {paths['model']}"
    )
    limit = ws.sizes.decoders_images
    with contextlib.chdir(ws.options.project):  # the pipeline's files name each other from there
        for method, beam_size in DECODERS:
            settings = dataclasses.replace(params, decoder=method, beam_size=beam_size)
            row = score_and_time(model, paths, table, settings, limit, decoder)
            human = {k: row.pop(k) for k in list(row) if k.startswith("human_")}
            images = row.pop("images")
            result.add_row(row)
    result.add("images", images, "")
    for name, value in human.items():
        result.add(f"one human reference vs the others: {name[len('human_') :]}", value, "")
    result.notes.append(
        "scores from evaluate_split, as the evaluate stage computes them (greedy matches "
        "reports/metrics.json for the same model and params); captions/s times decode_images "
        "alone (feature reads + decoding, after evaluate_split traced it), scoring excluded"
    )
    return result


def _train(project: Path, params: TrainParams, workdir: Path):
    """Fit one decoder on the project's cached features: the model and its training figures."""
    store, tokens = FeatureStore(project / FEATURES_DIR), project / TOKENS_DIR
    vocabulary = Vocabulary.from_json((tokens / "vocab.json").read_text())
    table = pd.read_parquet(project / CAPTION_TABLE)
    val_rows = table[table["split"] == "val"]
    references = {int(i): list(g["caption"]) for i, g in val_rows.groupby("image_id")}
    extractor = json.loads((project / FEATURES_DIR / "extractor.json").read_text())
    clock = BatchClock()
    model, summary = fit_captioner(
        store, vocabulary, CaptionSet.load(tokens, "train"), CaptionSet.load(tokens, "val"),
        params, extractor, workdir / "checkpoints", workdir / "history.csv", callbacks=[clock],
        val_references=references, val_scorer=source_scorer(project / RAW_DIR),
    )  # fmt: skip
    steps = clock.after_first_epoch  # captions_per_image 0 or 1: one caption per row
    return model, {
        "parameters": int(model.count_params()),
        "decoder parameters": int(model.decoder.count_params()),
        "epochs run": summary["epochs_run"],
        "train pairs/s": params.batch_size * len(steps) / sum(steps) if steps else float("nan"),
    }


def one_image(project: Path, model) -> Timing:
    """Seconds to caption one test image from its bytes, greedy, after a warm-up."""
    table = pd.read_parquet(project / CAPTION_TABLE)
    data = Path(table[table["split"] == "test"]["path"].iloc[0]).read_bytes()
    captioner = ImageCaptioner(model)
    return timed(lambda: captioner.caption_bytes([data]), LATENCY_REPEATS)


def bench_architectures(ws) -> Result:
    project = ws.options.project.resolve()
    paths = decoder_inputs(project, Path(__file__))  # any file stands for the model it trains
    base = load_section("train", paths["params"])
    evaluate = load_section("evaluate", paths["params"])
    overrides = dict(ws.options.overrides)
    result = Result(f"architectures: {', '.join(ws.options.decoders)} on {project}, {overrides}")
    table = pd.read_parquet(paths["captions"])
    with contextlib.chdir(project):
        for name in ws.options.decoders:
            changed = {**dataclasses.asdict(base), **overrides, "decoder": name}
            with tempfile.TemporaryDirectory() as workdir:
                model, row = _train(
                    project, from_dict(TrainParams, "train", changed), Path(workdir)
                )
            for method, beam in DECODERS[:2]:
                settings = dataclasses.replace(evaluate, decoder=method, beam_size=beam)
                scored = score_and_time(model, paths, table, settings, ws.sizes.decoders_images)
                label, _ = scored.pop("decoder"), scored.pop("images")
                row.update({f"{label} {k}": v for k, v in scored.items() if "human" not in k})
            latency = one_image(project, model)
            row["one image ms"], row["one image spread"] = 1000 * latency.median, latency.spread
            result.add_row({"decoder": name, **row})
    result.notes.append(
        f"one image ms: ImageCaptioner.caption_bytes, median of {LATENCY_REPEATS} after a warm-up; "
        "spread = (slowest - fastest) / median"
    )
    return result
