"""Training benchmarks: the compiled whole-sequence step against the tutorial's loop, precisions.

`bench_train` measures caption pairs/s of the project's `Captioner.fit` (one
XLA-compiled step over the whole sequence, also with image-major batches) and
of the TensorFlow tutorial's train_step, a Python loop over time steps inside a
GradientTape, both as the tutorial writes it and with the per-sequence work
hoisted out of the loop. The loops here are the baselines; they use the
model's own layers, so the loop is the only difference, and the benchmark first
checks that they compute the scan's logits. `bench_precision` times the step
the train stage runs for each `train.precision`, with its share of the float32
and of the half-precision matmul peak (tensor cores, on a GPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from benchmarks.flops import (
    TRAINING_PER_FORWARD,
    add_utilisation,
    captioner_flops,
    matmul_gflops,
    peak_gflops,
)
from benchmarks.harness import BatchClock, Result, Timing, seconds, timed
from benchmarks.workspace import (
    CAPTION_TOKENS,
    CAPTIONS_PER_IMAGE,
    CHANNELS,
    LOCATIONS,
    TRAIN_BATCH,
    Workspace,
    compile_for_training,
    fake_features,
    fake_tokens,
    model_sizes,
    tutorial_model,
)
from captioning.config import TrainParams
from captioning.data.text import PAD_ID
from captioning.model.captioner import Captioner
from captioning.training.distributed import distributed_step, make_strategy
from captioning.training.engine import make_optimizer

# ----------------------------------------------------------------------------- the tutorial's loop


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


# ----------------------------------------------------------------------------- timing steps


Batch = tuple[np.ndarray, np.ndarray]  # features (B, L, C) float16, tokens int32


def _fake_batches(count: int, vocab_size: int, rng: np.random.Generator) -> list[Batch]:
    return [
        (fake_features(rng, TRAIN_BATCH), fake_tokens(TRAIN_BATCH, vocab_size, rng))
        for _ in range(count)
    ]


def _add_logit_gaps(result: Result, model: Captioner, data: list[Batch]) -> None:
    """The one-step loops must compute what the scan computes, or the comparison is moot."""
    features, tokens = data[0]
    scan_logits, _ = model((features, tokens[:, :-1]))
    for hoisted, name in ((False, "tutorial loop"), (True, "hoisted loop")):
        gap = tf.reduce_max(tf.abs(scan_logits - loop_logits(model, features, tokens, hoisted)))
        result.add(f"max |logit| gap, {name} vs scan", float(gap), "")


def _dataset(items: list[Batch], tokens_shape: tuple) -> tf.data.Dataset:
    """`items` as tf.data with caption_batches' signature and prefetching.

    Shapes are left unknown, as caption_batches leaves them, so the trace is
    the one training uses.
    """
    signature = (
        tf.TensorSpec((None, LOCATIONS, CHANNELS), tf.float16),
        tf.TensorSpec(tokens_shape, tf.int32),
    )
    batches = tf.data.Dataset.from_generator(lambda: iter(items), output_signature=signature)
    return batches.apply(tf.data.experimental.assert_cardinality(len(items))).prefetch(2)


def _fit_seconds(model: Captioner, batches: tf.data.Dataset) -> float:
    """One fit over all batches, clocked from the end of the first (traced) batch to the
    end of the last: fit's own set-up costs about half a second per call."""
    clock = BatchClock()
    model.fit(batches, shuffle=False, verbose=0, callbacks=[clock])
    return clock.ends[-1] - clock.ends[0]


def _compiled_rate(model: Captioner, data: list[Batch]) -> float:
    """Pairs/s of `Captioner.fit` on one caption per row."""
    seconds_taken = _fit_seconds(model, _dataset(data, (None, None)))
    return (len(data) - 1) * TRAIN_BATCH / seconds_taken


def _image_major_rate(
    model: Captioner, data: list[Batch], vocab_size: int, rng: np.random.Generator
) -> tuple[float, int]:
    """Pairs/s of `Captioner.fit` on image-major batches, and the images per batch.

    What the train stage runs with train.captions_per_image set: the encoder
    and attention keys once per image (at batch 64: 13 images x 5 captions).
    """
    k = CAPTIONS_PER_IMAGE
    n_images = round(TRAIN_BATCH / k)
    grouped = [
        (f[:n_images], fake_tokens(n_images * k, vocab_size, rng).reshape(n_images, k, -1))
        for f, _ in data
    ]
    # A fresh train function: Keras' reduce_retracing would otherwise relax the traced
    # token spec from (B, T) to unknown rank, and the model needs to see (n, K, T).
    model.make_train_function(force=True)
    seconds_taken = _fit_seconds(model, _dataset(grouped, (None, k, None)))
    return (len(data) - 1) * n_images * k / seconds_taken, n_images


def _loop_rate(model: Captioner, optimizer, step: Callable, data: list[Batch]) -> float:
    """Pairs/s of a step loop over data[1:], after data[0] warms it up (and traces it)."""

    def run(batch: Batch):
        return step(model, optimizer, *map(tf.convert_to_tensor, batch)).numpy()

    run(data[0])
    return (len(data) - 1) * TRAIN_BATCH / seconds(lambda: [run(b) for b in data[1:]])


def _step_elements(data: list[Batch]) -> tf.data.Dataset:
    """`data` as the distributed step's elements: features, tokens, global tokens and rows."""
    elements = [(f, t, np.float32(np.sum(t[:, 1:] != PAD_ID)), np.float32(len(t))) for f, t in data]
    signature = (
        tf.TensorSpec((None, LOCATIONS, CHANNELS), tf.float16),
        tf.TensorSpec((None, None), tf.int32),
        tf.TensorSpec((), tf.float32),
        tf.TensorSpec((), tf.float32),
    )
    return tf.data.Dataset.from_generator(lambda: iter(elements), output_signature=signature)


def precision_steps(vocab_size: int, batches: int, precision: str) -> Timing:
    """Seconds of each of `batches` steps that `train.precision` runs, on fake batches.

    The step is `captioning.training.distributed.distributed_step` on one device, as
    the train stage runs it whenever train.distribute or train.precision is
    set: model and optimizer built under the Keras dtype policy `precision`
    (float32, mixed_float16 with loss scaling, mixed_bfloat16), the loss in
    float32. The global policy is restored afterwards.
    """
    data = _fake_batches(batches + 1, vocab_size, np.random.default_rng(0))
    params = dataclasses.replace(TrainParams(), precision=precision)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = tutorial_model(vocab_size)
        optimizer = make_optimizer(params, len(data), summed=True)
        optimizer.build(model.trainable_variables)
        step = distributed_step(make_strategy("none"), model, optimizer, params.jit_compile)
        iterator = iter(_step_elements(data))
        return timed(lambda: step(iterator).numpy(), batches)  # the warm-up traces, compiles
    finally:
        keras.mixed_precision.set_global_policy(policy)


# ----------------------------------------------------------------------------- utilisation


def _add_train_utilisation(
    result: Result, ws: Workspace, model: Captioner, compiled: float, image_major: float
) -> None:
    """FLOPs per pair, share of the peak, and the speed of the step's own matmul shapes.

    The per-word recurrence is a chain of small matmuls (batch rows x 512), fc2
    over every word at once the step's one big matmul. Timed alone, in the
    same rounds as the peak's square matmuls (eagerly traced and XLA-compiled,
    as the step is), they say whether the matmul shapes bound the step or
    something else does.
    """
    flops = captioner_flops(model)
    words = CAPTION_TOKENS - 1
    peak, size = ws.peak_gflops(), ws.sizes.peak_matmul
    per_pair = TRAINING_PER_FORWARD * flops.forward(words)
    add_utilisation(result, peak, size, per_pair, {"compiled (fit)": compiled}, "caption pair")
    image_major_pair = TRAINING_PER_FORWARD * flops.forward(words, CAPTIONS_PER_IMAGE)
    rates = {"compiled, image-major": image_major}
    add_utilisation(result, peak, size, image_major_pair, rates, "pair, image-major")
    c = model.model_config
    b, u, a = TRAIN_BATCH, c.units, c.attention_units
    shapes = {  # (m, k, n): the peak's, and the step's own matmuls
        f"peak {size}^2": (size, size, size),
        f"per-word recurrent {b}x{u} @ {u}x{a + 3 * u}": (b, u, a + 3 * u),
        f"per-word recurrent, XLA-compiled {b}x{u} @ {u}x{a + 3 * u}": (b, u, a + 3 * u),
        f"fc2 over all words {b * words}x{u} @ {u}x{ws.vocab_size}": (b * words, u, ws.vocab_size),
    }
    jit = tuple(name for name in shapes if "XLA" in name)
    for name, rate in matmul_gflops(shapes, jit=jit).items():
        result.add(f"matmul alone, same rounds: {name}", rate, "GFLOP/s")
    result.notes.append(
        f"model FLOPs: {TRAINING_PER_FORWARD} x the forward pass over {words} words "
        "(padding included: the step computes it), image work per pair (or per K pairs "
        "image-major); a multiply-add is 2 FLOPs"
    )


# ----------------------------------------------------------------------------- the benchmark


def bench_train(ws: Workspace) -> Result:
    sizes, vocab = ws.sizes, ws.vocab_size
    result = Result(
        f"train: caption pairs/s, batch {TRAIN_BATCH}, {CAPTION_TOKENS}-token captions, "
        f"tutorial sizes ({model_sizes()}), vocab {vocab}"
    )
    rng = np.random.default_rng(0)
    data = _fake_batches(sizes.train_batches + 1, vocab, rng)  # one more for warm-up
    model = tutorial_model(vocab)
    compile_for_training(model)
    _add_logit_gaps(result, model, data)

    compiled = _compiled_rate(model, data)
    image_major, n_images = _image_major_rate(model, data, vocab, rng)
    optimizer = keras.optimizers.Adam(TrainParams().learning_rate)
    optimizer.build(model.trainable_variables)
    eager = _loop_rate(model, optimizer, tutorial_train_step, data)
    hoisted = _loop_rate(model, optimizer, hoisted_train_step, data)

    k = CAPTIONS_PER_IMAGE
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
    _add_train_utilisation(result, ws, model, compiled, image_major)
    if sizes.train_unrolled:
        unrolled = _loop_rate(model, optimizer, tf.function(tutorial_train_step), data)
        result.add("tutorial loop, tf.function (unrolled)", unrolled, "pairs/s")
        result.add("compiled / tf.function tutorial loop", compiled / unrolled, "x")
    else:
        result.notes.append("--quick skips the tf.function-decorated tutorial loop")
    result.notes.append(f"{sizes.train_batches} timed batches per variant after one warm-up batch")
    return result


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # train.precision's values
_HALF = {"mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}


def bench_precision(ws: Workspace) -> Result:
    """Training pairs/s under each train.precision, with its share of float32 and half peaks."""
    sizes = ws.sizes
    result = Result(
        f"precision: caption pairs/s by train.precision (the step the train stage runs for it), "
        f"batch {TRAIN_BATCH}, {sizes.train_batches} timed batches"
    )
    words = CAPTION_TOKENS - 1
    per_pair = TRAINING_PER_FORWARD * captioner_flops(tutorial_model(ws.vocab_size)).forward(words)
    peak32 = ws.peak_gflops()
    result.add(f"peak float32 ({sizes.peak_matmul}^2 matmul)", peak32, "GFLOP/s")
    result.add("model FLOPs per caption pair (training)", per_pair / 1e9, "GFLOP")
    for precision in PRECISIONS:
        try:
            steps = precision_steps(ws.vocab_size, sizes.train_batches, precision)
        except Exception as err:  # a precision this device or the model cannot run: say which
            result.notes.append(f"{precision} failed: {type(err).__name__}: {str(err)[:300]}")
            continue
        rate = len(steps.samples) * TRAIN_BATCH / sum(steps.samples)
        achieved = per_pair * rate / 1e9
        row = {"precision": precision, "pairs/s": rate, "step spread": steps.spread}
        row["GFLOP/s"] = achieved
        row["% of float32 peak"] = 100 * achieved / peak32
        if precision in _HALF:
            half = peak_gflops(sizes.peak_matmul, _HALF[precision])
            row.update({"half peak GFLOP/s": half, "% of half peak": 100 * achieved / half})
        result.add_row(row)
    return result
