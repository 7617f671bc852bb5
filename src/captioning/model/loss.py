"""The training loss: masked token cross-entropy plus the attention coverage penalty.

One function, `masked_loss`, that both training engines reach through
`Captioner.figures`: cross-entropy over non-pad targets (optionally label
smoothed) and Xu et al.'s doubly stochastic attention penalty, with optional
global denominators so that a replica's loss is its share of a larger batch.
"""

from __future__ import annotations

import tensorflow as tf

from captioning.data.text import PAD_ID


def masked_loss(
    targets,
    logits,
    weights,
    attention_penalty: float,
    label_smoothing: float = 0.0,
    total_tokens=None,
    total_rows=None,
):
    """Token cross-entropy over non-pad targets + the doubly stochastic attention penalty.

    targets (B, T) int, logits (B, T, V), weights (B, T, L). With
    `label_smoothing` e the target distribution is (1 - e) on the true word and
    e spread evenly over the vocabulary (Szegedy et al. 2016). The penalty is
    Xu et al.'s sum_l (1 - sum_t alpha_tl)^2, averaged over locations so its
    weight does not depend on the feature map size. Returns (loss, ce, penalty);
    `ce` is always the plain cross-entropy, so runs with and without smoothing
    compare. `total_tokens` / `total_rows` divide by a larger batch's non-pad
    targets and captions instead of this batch's, so that a replica's result is
    its share of the global batch's loss (captioning.training.distributed).
    """
    mask = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)  # (B, T)
    tokens = tf.reduce_sum(mask) if total_tokens is None else total_tokens
    denominator = tf.maximum(tokens, 1.0)
    token_ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    ce = tf.reduce_sum(token_ce * mask) / denominator
    if label_smoothing:
        # -sum_v q_v log p_v with q = (1 - e) onehot + e / V, without a (B, T, V) one-hot.
        uniform_ce = -tf.reduce_mean(tf.nn.log_softmax(logits, axis=-1), axis=-1)  # (B, T)
        smoothed = (1.0 - label_smoothing) * token_ce + label_smoothing * uniform_ce
        fit = tf.reduce_sum(smoothed * mask) / denominator
    else:
        fit = ce
    coverage = tf.reduce_sum(weights * mask[..., None], axis=1)  # (B, L)
    if total_rows is None:
        penalty = tf.reduce_mean(tf.square(1.0 - coverage))
    else:
        locations = tf.cast(tf.shape(coverage)[1], tf.float32)
        penalty = tf.reduce_sum(tf.square(1.0 - coverage)) / (total_rows * locations)
    return fit + attention_penalty * penalty, ce, penalty
