"""The attention GRU decoder: Bahdanau attention over image locations feeding a GRU.

The tutorial's decoder ("show, attend and tell" in TensorFlow's docs), rebuilt
for Keras 3 with two fixes: the GRU state is carried from word to word (the
tutorial re-initialises its `GRU` layer at every step, so only attention saw the
history), and teacher forcing runs over the whole sequence inside one compiled
step (`tf.scan` over time, output layers applied once to all steps) instead of a
Python loop over time steps. `start_decoding` / `decode_step` drive it one word
at a time for `captioning.model.decode`, the same interface the transformer
decoder offers.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

PACKAGE = "captioning"


@keras.saving.register_keras_serializable(package=PACKAGE)
class BahdanauAttention(layers.Layer):
    """Additive attention: score = V(tanh(W1 features + W2 hidden)); returns (context, weights)."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.W1 = layers.Dense(units, name="W1")
        self.W2 = layers.Dense(units, name="W2")
        self.V = layers.Dense(1, name="V")

    def build(self, features_shape, hidden_shape=None):
        self.W1.build(features_shape)
        self.W2.build((None, hidden_shape[-1] if hidden_shape else self.units))
        self.V.build((None, None, self.units))

    def project_features(self, features):
        """W1 features, computed once per image instead of once per word."""
        return self.W1(features)  # (B, L, A)

    def attend(self, features, projected, hidden):
        return self.attend_query(features, projected, self.W2(hidden))

    def attend_query(self, features, projected, query):
        """`attend` with W2 hidden already computed (the decoder fuses it with the GRU's matmul)."""
        energy = tf.tanh(projected + query[:, None, :])  # (B, L, A)
        # V as an einsum rather than Dense on a 3-D tensor: same weights, and it
        # keeps the loop body free of dynamic-shape tensordots (XLA-friendly).
        score = tf.einsum("bla,ao->blo", energy, self.V.kernel)[..., 0] + self.V.bias[0]  # (B, L)
        weights = tf.nn.softmax(score, axis=-1)  # (B, L)
        context = tf.einsum("bl,ble->be", weights, features)  # (B, E)
        return context, weights

    def call(self, features, hidden):
        return self.attend(features, self.project_features(features), hidden)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionGRUDecoder(layers.Layer):
    """Embedding -> attention over image locations -> GRU cell -> fc1 -> fc2 (logits).

    `step` decodes one word for a batch (used by every decoder in
    `captioning.model.decode`); `call` runs teacher forcing over a whole sequence.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        units: int,
        attention_units: int,
        encoder_dim: int,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.units = units
        self.attention_units = attention_units
        self.encoder_dim = encoder_dim
        self.embedding = layers.Embedding(vocab_size, embedding_dim, name="embedding")
        self.attention = BahdanauAttention(attention_units, name="attention")
        self.gru = layers.GRUCell(units, recurrent_initializer="glorot_uniform", name="gru")
        self.init_state = layers.Dense(units, activation="tanh", name="init_state")
        self.fc1 = layers.Dense(units, name="fc1")
        self.fc2 = layers.Dense(vocab_size, name="fc2")

    def build(self, features_shape=None, tokens_shape=None):
        self.embedding.build((None,))
        self.attention.build((None, None, self.encoder_dim), (None, self.units))
        self.gru.build((None, self.encoder_dim + self.embedding_dim))
        self.init_state.build((None, self.encoder_dim))
        self.fc1.build((None, self.units))
        self.fc2.build((None, self.units))

    def initial_state(self, features):
        """h0 from the mean image feature (Xu et al. 2015) rather than zeros."""
        return self.init_state(tf.reduce_mean(features, axis=1))  # (B, U)

    # The recurrence, written out with the GRU cell's own weights (Keras' GRUCell
    # maths, reset_after=True) so that its two matmuls can be rearranged: the
    # previous state feeds W2 (attention query) and the GRU's recurrent kernel in
    # one matmul, and the embedding's share of the GRU input projection runs
    # outside the time loop, for all words at once. `step` and `call` share it.

    def loop_weights(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The recurrence's per-sequence constants, built once per sequence, not per word.

        [W2 | recurrent kernel] (U, A + 3U) with its bias (everything computed
        from h_{t-1}), and the context's rows of the GRU input kernel (E, 3U).
        """
        _, recurrent_bias = tf.unstack(self.gru.bias)
        kernel = tf.concat([self.attention.W2.kernel, self.gru.recurrent_kernel], axis=1)
        bias = tf.concat([self.attention.W2.bias, recurrent_bias], axis=0)
        return kernel, bias, self.gru.kernel[: self.encoder_dim]

    def _embedded_inputs(self, tokens):
        """The embedding's part of the GRU input projection (+ input bias): (..., 3U)."""
        input_bias, _ = tf.unstack(self.gru.bias)
        kernel = self.gru.kernel[self.encoder_dim :]
        return tf.matmul(self.embedding(tokens), kernel) + input_bias

    def _recur(self, state, x_embedded, features, projected, loop_weights):
        """One word: attention from h_{t-1}, then the GRU update; returns (state, weights)."""
        state_kernel, state_bias, context_kernel = loop_weights
        from_state = tf.matmul(state, state_kernel) + state_bias  # (B, A + 3U)
        query, inner = from_state[:, : self.attention_units], from_state[:, self.attention_units :]
        context, weights = self.attention.attend_query(features, projected, query)
        x = tf.matmul(context, context_kernel) + x_embedded  # (B, 3U)
        x_z, x_r, x_h = tf.split(x, 3, axis=-1)
        inner_z, inner_r, inner_h = tf.split(inner, 3, axis=-1)
        z = tf.sigmoid(x_z + inner_z)
        r = tf.sigmoid(x_r + inner_r)
        candidate = tf.tanh(x_h + r * inner_h)
        return z * state + (1.0 - z) * candidate, weights

    def step(self, tokens, state, features, projected, loop_weights=None):
        """One word for each row: tokens (B,), state (B, U) -> logits (B, V), state, weights (B, L).

        Decoding loops pass `loop_weights()` computed before the loop.
        """
        if loop_weights is None:
            loop_weights = self.loop_weights()
        state, weights = self._recur(
            state, self._embedded_inputs(tokens), features, projected, loop_weights
        )
        return self.fc2(self.fc1(state)), state, weights

    def start_decoding(self, encoded, copies: int = 1):
        """(memory, state) before the first word; every row repeated `copies` times (beams).

        memory: the per-batch constants `step` reads (features, attention keys,
        loop weights); state: h0 (B, U). `captioning.model.decode` drives every
        decoder through this and `decode_step`.
        """
        projected = self.attention.project_features(encoded)
        state = self.initial_state(encoded)
        if copies > 1:
            encoded, projected, state = (
                tf.repeat(x, copies, axis=0) for x in (encoded, projected, state)
            )
        return (encoded, projected, self.loop_weights()), state

    def decode_step(self, tokens, state, memory):
        """tokens (B,) -> logits (B, V), state (B, U), weights (B, L)."""
        return self.step(tokens, state, *memory)

    def call(self, features, tokens, captions_per_image: int | None = None):
        """Teacher forcing: features (B, L, E), tokens (B, T) -> logits (B, T, V), weights (B, T, L).

        With `captions_per_image` K, features are (n, L, E) and tokens (n * K, T),
        image-major: the attention keys and the initial state are computed once
        per image, then repeated for its K captions.
        """
        projected = self.attention.project_features(features)
        state0 = self.initial_state(features)
        if captions_per_image:
            features, projected, state0 = (
                tf.repeat(x, captions_per_image, axis=0) for x in (features, projected, state0)
            )
        # (T, B, 3U): one big matmul for every word's embedding, outside the loop.
        x_embedded = tf.transpose(self._embedded_inputs(tokens), [1, 0, 2])
        loop_weights = self.loop_weights()
        weights0 = tf.zeros_like(features[:, :, 0])  # (B, L)

        def one_step(carry, x_t):
            state, _ = carry
            return self._recur(state, x_t, features, projected, loop_weights)

        # One graph loop over time; only attention and the GRU are inside it.
        states, weights = tf.scan(one_step, x_embedded, initializer=(state0, weights0))
        logits = self.fc2(self.fc1(states))  # (T, B, V): one big matmul for all steps
        return tf.transpose(logits, [1, 0, 2]), tf.transpose(weights, [1, 0, 2])

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "attention_units": self.attention_units,
            "encoder_dim": self.encoder_dim,
        }
