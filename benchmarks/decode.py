"""Decoding benchmark: batched greedy decoding against one image at a time.

`bench_decode` times greedy captions/s of `CaptionDecoder` on batches of the
evaluate stage's size (and a bigger one) against one image at a time and
against the tutorial's eager loop, with an untrained model of the tutorial's
sizes; the matmuls-only ceiling says what a batch could reach at best.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from benchmarks.flops import add_utilisation, captioner_flops
from benchmarks.harness import Result, seconds
from benchmarks.workspace import EVALUATE_BATCH, Sizes, Workspace, fake_features, tutorial_model
from captioning.data.text import END_ID, PAD_ID, START_ID
from captioning.model.captioner import Captioner
from captioning.model.decode import CaptionDecoder

DECODE_MAX_LEN = 20
DECODE_BATCHES = (EVALUATE_BATCH, 256)  # the evaluate stage's batch, and a bigger one


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
