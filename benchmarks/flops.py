"""Model FLOPs and the machine's peak: how close each stage runs to what the hardware can do.

The way language-model trainers report model FLOPs utilisation: count the
floating-point operations the model needs per item from its layers' shapes
(a multiply-add is 2 FLOPs; biases, activations, normalisation and softmax
are left out as negligible), multiply by the items per second a benchmark
measured, and divide by the machine's peak, measured in the same run as a
large matmul in TensorFlow. `layer_flops` counts a built functional Keras model
(InceptionV3: its Conv2D and Dense layers); `captioner_flops` counts the
captioner's per-image work (encoder Dense, attention keys, initial state) and
per-word work (embedding and context projections, the recurrent matmul,
attention scores and context, fc1, fc2). Training costs about 3x the forward
pass (the backward pass computes gradients for inputs and weights: two
matmuls for each forward one).
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import tensorflow as tf

TRAINING_PER_FORWARD = 3  # forward + backward (input and weight gradients)
PEAK_SIZE = 4096  # side of the square matmuls that measure the peak


def _leaf_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def layer_flops(model: keras.Model) -> int:
    """Forward FLOPs per example of a built functional model: its Conv2D and Dense layers.

    Conv2D: 2 * kh * kw * (cin / groups) * cout per output position; Dense:
    2 * din * dout per position it is applied at (all but the batch and last axes).
    """
    total = 0
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            positions = math.prod(layer.output.shape[1:-1])  # (h, w) or the Dense's leading axes
            total += 2 * math.prod(layer.kernel.shape) * positions
    return total


@dataclasses.dataclass(frozen=True)
class CaptionerFlops:
    """Forward FLOPs of the captioner: once per image, and once per word of a caption."""

    per_image: int  # encoder Dense, attention keys (W1), initial state
    per_word: int  # one step of attention + GRU + fc1 + fc2

    def forward(self, words: int, captions_per_image: int = 1) -> float:
        """Forward FLOPs per caption of `words` words; image work shared by its captions."""
        return self.per_image / captions_per_image + words * self.per_word


def captioner_flops(model) -> CaptionerFlops:
    """Count a built `Captioner`'s FLOPs from its layers' kernel shapes."""
    locations = model.model_config.num_locations  # L
    channels, encoded = model.encoder.fc.kernel.shape  # (C, E)
    d = model.decoder
    _, attention = d.attention.W1.kernel.shape  # (E, A)
    gru_inputs, gates = d.gru.kernel.shape  # (E + D, 3U)
    units, vocab = d.fc2.kernel.shape  # (U, V)
    per_image = 2 * locations * (channels * encoded + encoded * attention) + 2 * encoded * units
    per_word = 2 * (
        gru_inputs * gates  # embedding and context into the GRU's input projection
        + units * (attention + gates)  # [W2 | recurrent kernel] from the previous state
        + locations * attention  # attention scores (V)
        + locations * encoded  # the context: weights times encoded features
        + units * units  # fc1
        + units * vocab  # fc2: the logits
    )
    return CaptionerFlops(per_image=per_image, per_word=per_word)


def _matmul_loop(m: int, k: int, n: int, dtype: tf.DType, jit: bool):
    """run(count) -> seconds of `count` (m x k) @ (k x n) matmuls in one traced loop.

    Each iteration's input depends on the sum of the last product, so no
    matmul can be skipped or hoisted out of the loop; one scalar comes back.
    """
    a = tf.cast(tf.random.stateless_normal((m, k), [0, 2]), dtype)
    b = tf.cast(tf.random.stateless_normal((k, n), [0, 3]), dtype)

    @tf.function(jit_compile=jit)
    def loop(a, count):
        total = tf.zeros((), tf.float32)
        for _ in tf.range(count):
            # The whole product is summed (m*n adds against 2*m*k*n FLOPs): a compiler
            # may compute only the elements that are used.
            total += tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32))
            a = a + tf.cast(total * 0.0, dtype)  # a dependency on the last product
        return total

    def run(count: int) -> float:
        start = time.perf_counter()
        loop(a, tf.constant(count)).numpy()
        return time.perf_counter() - start

    run(1)  # warm-up: tracing, kernel selection, thread pools
    return run


def matmul_gflops(
    shapes: dict[str, tuple[int, int, int]],
    dtype: tf.DType = tf.float32,
    seconds_per_try: float = 0.5,
    rounds: int = 3,
    jit: tuple[str, ...] = (),
) -> dict[str, float]:
    """Best GFLOP/s of each named (m, k, n) matmul shape, timed in alternating rounds.

    Rounds take turns over the shapes, so a change in the machine's load hits
    each about equally; the best round of each is kept. Names in `jit` run
    XLA-compiled. As many matmuls per try as fill about `seconds_per_try`.
    """
    loops, counts, best = {}, {}, dict.fromkeys(shapes, 0.0)
    for name, (m, k, n) in shapes.items():
        loops[name] = _matmul_loop(m, k, n, dtype, name in jit)
        counts[name] = max(1, round(seconds_per_try / max(loops[name](1), 1e-6)))
    for _ in range(rounds):
        for name, (m, k, n) in shapes.items():
            rate = 2 * m * k * n * counts[name] / loops[name](counts[name]) / 1e9
            best[name] = max(best[name], rate)
    return best


def peak_gflops(size: int = PEAK_SIZE, dtype: tf.DType = tf.float32) -> float:
    """The machine's peak: best GFLOP/s of (size x size) matmuls over three tries."""
    return matmul_gflops({"peak": (size, size, size)}, dtype, seconds_per_try=1.0)["peak"]


def add_utilisation(
    result, peak: float, peak_size: int, flops: float, rates: dict[str, float], what: str
) -> None:
    """Add FLOPs per item, the peak, achieved GFLOP/s and share of the peak for each rate.

    `result` is a benchmark `Result`, `peak` the float32 GFLOP/s of
    `peak_size`-square matmuls measured beside the rates, `rates` {label:
    items per second}, `what` the item.
    """
    result.add(f"model FLOPs per {what}", flops / 1e9, "GFLOP")
    result.add(f"peak (float32 {peak_size}^2 matmul, this benchmark)", peak, "GFLOP/s")
    for label, rate in rates.items():
        achieved = flops * rate / 1e9
        result.add(f"{label}: achieved", achieved, "GFLOP/s")
        result.add(f"{label}: share of peak", 100 * achieved / peak, "%")
