"""Decoding benchmarks: batched greedy decoding speed, and greedy vs beam search on real outputs.

`bench_decode` times greedy captions/s of `CaptionDecoder` on batches of the
evaluate stage's size (and a bigger one) against one image at a time and
against the tutorial's eager loop, with an untrained model of the tutorial's
sizes; the matmuls-only ceiling says what a batch could reach at best.
`bench_decoders` (`--only decoders`) needs the pipeline's outputs: it scores
greedy, beam 3 and beam 5 on the evaluate split with the evaluate stage's own
`evaluate_split`, and times each decoder.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from benchmarks.flops import add_utilisation, captioner_flops
from benchmarks.results import Result, seconds
from benchmarks.workspace import (
    CAPTION_TABLE,
    EVALUATE_BATCH,
    FEATURES_DIR,
    PARAMS_FILE,
    RAW_DIR,
    Sizes,
    Workspace,
    fake_features,
    tutorial_model,
)
from captioning.config import EvaluateParams, load_section
from captioning.data.sources import REF_NAME, source_scorer
from captioning.data.text import END_ID, PAD_ID, START_ID
from captioning.evaluation.evaluate import decode_images, evaluate_split, references_by_image
from captioning.features import INDEX_FILE, FeatureStore
from captioning.model.captioner import Captioner, load_captioner
from captioning.model.decode import CaptionDecoder

DECODE_MAX_LEN = 20
DECODE_BATCHES = (EVALUATE_BATCH, 256)  # the evaluate stage's batch, and a bigger one
DECODERS = (("greedy", 1), ("beam", 3), ("beam", 5))  # (method, beam size)
QUALITY = (
    "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
    "object_accuracy", "grounding",
)  # fmt: skip


# ----------------------------------------------------------------------------- baselines


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
    return lambda n: seconds(lambda: words(state, tf.constant(n)).numpy())


# ----------------------------------------------------------------------------- decode


def _model_that_never_ends(vocab_size: int) -> Captioner:
    """An untrained tutorial-size model that never picks <pad>, <start> or <end>.

    Untrained, it may pick <end> (or <pad>) at any step; forbidding those makes
    every caption max_len words, so every way of decoding does the same work per caption.
    """
    model = tutorial_model(vocab_size)
    bias = model.decoder.fc2.bias.numpy()
    bias[[PAD_ID, START_ID, END_ID]] = -1e9
    model.decoder.fc2.bias.assign(bias)
    return model


def _timed_rounds(
    model: Captioner, batched: Callable, single: Callable, sizes: Sizes, per_round: int
) -> tuple[dict[int, float], float, dict[int, float]]:
    """Captions/s batched (by batch size), one at a time, and of the matmuls alone (by size).

    Rounds alternate the ways, so a change in the machine's load hits all of them.
    """
    matmuls = {size: word_matmuls(model, size) for size in DECODE_BATCHES}
    batched_s, matmuls_s = dict.fromkeys(DECODE_BATCHES, 0.0), dict.fromkeys(DECODE_BATCHES, 0.0)
    single_s = 0.0
    for _ in range(sizes.decode_repeats):
        for size in DECODE_BATCHES:
            batched_s[size] += seconds(lambda size=size: batched(size))
            matmuls_s[size] += matmuls[size](DECODE_MAX_LEN)  # one batch of captions' worth
        single_s += seconds(lambda: single(per_round))
    rounds = sizes.decode_repeats
    rate = {size: rounds * size / batched_s[size] for size in DECODE_BATCHES}
    matmul_rate = {size: rounds * size / matmuls_s[size] for size in DECODE_BATCHES}
    return rate, rounds * per_round / single_s, matmul_rate


def _eager_rate(model: Captioner, features: np.ndarray, count: int) -> float:
    """Captions/s of the tutorial's eager loop over the first `count` images, after a warm-up."""
    eager_greedy(model, features[:1], DECODE_MAX_LEN)
    eager_s = seconds(
        lambda: [eager_greedy(model, features[i : i + 1], DECODE_MAX_LEN) for i in range(count)]
    )
    return count / eager_s


def _word_matmul_flops(model: Captioner) -> int:
    """FLOPs of `word_matmuls`' per-row, per-word work: fc1, fc2, W2 and the GRU's two kernels."""
    d = model.decoder
    kernels = (d.fc1.kernel, d.fc2.kernel, d.attention.W2.kernel, d.gru.kernel)
    return 2 * (
        sum(int(np.prod(k.shape)) for k in kernels) + int(np.prod(d.gru.recurrent_kernel.shape))
    )


def _add_decode_utilisation(
    result: Result, ws: Workspace, model: Captioner, rate: dict, matmul_rate: dict
) -> None:
    """FLOPs per caption and share of the peak, batched; and the GFLOP/s of the matmuls alone."""
    per_caption = captioner_flops(model).forward(DECODE_MAX_LEN)
    rates = {f"batched greedy, batch {size}": rate[size] for size in DECODE_BATCHES}
    what = f"caption ({DECODE_MAX_LEN} words, forward)"
    add_utilisation(result, ws.peak_gflops(), ws.sizes.peak_matmul, per_caption, rates, what)
    per_row = _word_matmul_flops(model) * DECODE_MAX_LEN
    for size in DECODE_BATCHES:
        result.add(f"matmuls alone, batch {size}", per_row * matmul_rate[size] / 1e9, "GFLOP/s")


def bench_decode(ws: Workspace) -> Result:
    sizes, vocab = ws.sizes, ws.vocab_size
    small, big = DECODE_BATCHES
    result = Result(
        f"decode: greedy captions/s, max_len {DECODE_MAX_LEN}, tutorial sizes, vocab {vocab} "
        f"(batch {small} and {big} vs one image at a time, same CaptionDecoder)"
    )
    model = _model_that_never_ends(vocab)
    features = fake_features(np.random.default_rng(0), big)
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
    per_round = max(1, sizes.decode_single // sizes.decode_repeats)
    rate, single_rate, matmul_rate = _timed_rounds(model, batched, single, sizes, per_round)
    eager_rate = _eager_rate(model, features, sizes.decode_eager)

    ratio = f"batched (batch {small}) / one at a time (per caption)"
    result.add("mean caption length (words)", float(np.mean(lengths)), "")
    for size in DECODE_BATCHES:
        result.add(f"batched greedy, batch {size}", rate[size], "captions/s")
    result.add("one image at a time", single_rate, "captions/s")
    result.add(ratio, rate[small] / single_rate, "x")
    result.add(f"batch {big} / batch {small}", rate[big] / rate[small], "x")
    for size in DECODE_BATCHES:  # if a batch did nothing but its matmuls, at the speed measured
        ceiling = matmul_rate[size] / single_rate
        result.add(f"ceiling: batch {size} matmuls alone / one at a time", ceiling, "x")
    result.add("tutorial eager loop, one image", eager_rate, "captions/s")
    result.add("batched / tutorial eager loop", rate[small] / eager_rate, "x")
    result.check(ratio, ">= 20", rate[small] / single_rate >= 20)
    _add_decode_utilisation(result, ws, model, rate, matmul_rate)
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


# ----------------------------------------------------------------------------- decoders


def decoder_inputs(project: Path, model: Path) -> dict[str, Path]:
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


def _evaluation_set(paths: dict[str, Path], params: EvaluateParams, limit: int | None):
    """The caption table and the sorted evaluate-split image ids, cut to `limit` images."""
    table = pd.read_parquet(paths["captions"])
    image_ids = np.asarray(sorted(references_by_image(table, params.split)), dtype=np.int64)
    if limit is not None:  # --quick: the split's first images only
        image_ids = image_ids[:limit]
        table = table[(table["split"] != params.split) | table["image_id"].isin(image_ids)]
    return table, image_ids


def _score_and_time(
    model, store, table, image_ids, settings, objects, decoder
) -> tuple[dict, dict]:
    """One decoder's row (scores, mean words, captions/s) and the human-agreement figures."""
    decode_images(model, store, image_ids, settings, decoder)  # warm-up: traces each shape
    start = time.perf_counter()
    timed = decode_images(model, store, image_ids, settings, decoder)
    decode_s = time.perf_counter() - start
    scored = evaluate_split(model, store, table, settings, objects)
    if scored.decoded.captions != timed.captions:
        raise RuntimeError(
            f"{settings.decoder}: evaluate_split decoded other captions than the timed run"
        )
    name = "greedy" if settings.decoder == "greedy" else f"{settings.decoder} {settings.beam_size}"
    row = {"decoder": name}
    row.update({metric: scored.corpus[metric] for metric in QUALITY if metric in scored.corpus})
    row["mean words"] = scored.corpus["mean_words"]
    row["captions/s"] = len(image_ids) / decode_s
    human = {k: v for k, v in scored.corpus.items() if k.startswith("human_")}
    return row, human


def bench_decoders(ws: Workspace) -> Result:
    paths = ws.pipeline
    params = load_section("evaluate", paths["params"])
    table, image_ids = _evaluation_set(paths, params, ws.sizes.decoders_images)
    model = load_captioner(str(paths["model"]))
    store = FeatureStore(paths["features"])
    objects = source_scorer(paths["raw"])
    result = Result(
        f"decoders: greedy vs beam 3 vs beam 5 on the {params.split} split "
        f"({len(image_ids)} images, max_len {params.max_len}, batch {params.batch_size}), "
        f"{paths['model']}"
    )
    decoder = CaptionDecoder(model)
    human: dict[str, float] = {}
    for method, beam_size in DECODERS:
        settings = dataclasses.replace(params, decoder=method, beam_size=beam_size)
        row, human = _score_and_time(model, store, table, image_ids, settings, objects, decoder)
        result.add_row(row)
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
