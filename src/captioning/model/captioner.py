"""The captioning model: encoder, Bahdanau attention, GRU decoder, and the trainer.

The tutorial's design ("show, attend and tell" in TensorFlow's docs), rebuilt for
Keras 3 with three fixes users ask for:
- the GRU state is carried from word to word (the tutorial re-initialises its
  `GRU` layer at every step, so only attention saw the history);
- training runs teacher forcing over the whole sequence inside one compiled
  step (`tf.scan` over time, output layers applied once to all steps) instead
  of a Python loop over time steps;
- InceptionV3 features are standardised by train-set statistics stored in the
  encoder, so random-init features (tiny values) train as well as ImageNet ones.

`train.decoder: transformer` puts `captioning.model.transformer`'s decoder in the
GRU's place, over the same encoder, loss and training step; both decoders
offer `start_decoding` / `decode_step` to `captioning.model.decode`.

Every layer takes explicit constructor arguments, implements `get_config`, and
is registered serialisable; the `Captioner` carries its `ModelConfig` and its
vocabulary, so a saved `.keras` file is all that inference needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from captioning.config import FeaturesParams, TrainParams
from captioning.data.text import PAD_ID, Vocabulary
from captioning.model.transformer import TransformerDecoder

PACKAGE = "captioning"
DECODERS = ("gru", "transformer")  # TrainParams.decoder's choices


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes the network; saved inside the model.

    Fields that mirror a params.yaml key (the train sizes and loss weights, the
    features extractor) take their defaults from that section's dataclass, so
    the two cannot drift apart.
    """

    vocab_size: int  # the vocabulary's length, specials included
    embedding_dim: int = TrainParams.embedding_dim
    units: int = TrainParams.units
    attention_units: int = TrainParams.attention_units
    encoder_dim: int = TrainParams.encoder_dim
    # InceptionV3's last block at its default input side (features.image_size):
    # an 8x8 grid read as 64 locations of 2048 channels.
    feature_dim: int = 2048
    num_locations: int = 64
    attention_penalty: float = TrainParams.attention_penalty
    label_smoothing: float = TrainParams.label_smoothing
    location_embedding: bool = TrainParams.location_embedding
    # Which decoder reads the encoded image; a model saved without the key is a GRU.
    decoder: str = TrainParams.decoder
    transformer_layers: int = TrainParams.transformer_layers
    transformer_heads: int = TrainParams.transformer_heads
    transformer_width: int = TrainParams.transformer_width
    transformer_ff: int = TrainParams.transformer_ff
    transformer_dropout: float = TrainParams.transformer_dropout
    # The extractor that made the features: inference must rebuild the same one.
    image_size: int = FeaturesParams.image_size
    extractor_weights: str = FeaturesParams.weights
    extractor_seed: int = FeaturesParams.seed
    extractor_digest: str = ""  # captioning.features.weights_digest; "" when not recorded


@keras.saving.register_keras_serializable(package=PACKAGE)
class CNNEncoder(layers.Layer):
    """Standardise InceptionV3 features, then Dense(encoder_dim) + ReLU per location.

    With `num_locations` set, a learned embedding per location is added after the
    ReLU: a weighted sum of encoded features then also carries where the weight was.
    """

    def __init__(
        self,
        encoder_dim: int,
        feature_dim: int = 2048,
        num_locations: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.encoder_dim = encoder_dim
        self.feature_dim = feature_dim
        self.num_locations = num_locations
        self.fc = layers.Dense(encoder_dim, activation="relu", name="fc")

    def build(self, input_shape=None):
        # Non-trainable so the optimiser leaves them alone; saved with the weights.
        self.feature_mean = self.add_weight(
            shape=(self.feature_dim,), initializer="zeros", trainable=False, name="feature_mean"
        )
        self.feature_std = self.add_weight(
            shape=(self.feature_dim,), initializer="ones", trainable=False, name="feature_std"
        )
        self.fc.build((None, None, self.feature_dim))
        if self.num_locations:
            self.location = self.add_weight(
                shape=(self.num_locations, self.encoder_dim),
                initializer=keras.initializers.RandomNormal(stddev=0.1),
                name="location",
            )

    def set_feature_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Use train-set per-channel statistics; tiny stds are floored to avoid blow-ups."""
        std = np.maximum(np.asarray(std, dtype=np.float32), 1e-6)
        self.feature_mean.assign(np.asarray(mean, dtype=np.float32))
        self.feature_std.assign(std)

    def call(self, features):
        x = (tf.cast(features, tf.float32) - self.feature_mean) / self.feature_std  # (B, L, F)
        encoded = self.fc(x)  # (B, L, E)
        if self.num_locations:
            encoded = encoded + self.location
        return encoded

    def get_config(self):
        return {
            **super().get_config(),
            "encoder_dim": self.encoder_dim,
            "feature_dim": self.feature_dim,
            "num_locations": self.num_locations,
        }


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


@keras.saving.register_keras_serializable(package=PACKAGE)
class Captioner(keras.Model):
    """Encoder + decoder trained with teacher forcing; carries config and vocabulary."""

    def __init__(self, config: dict | ModelConfig, vocabulary: list[str], **kwargs):
        super().__init__(**kwargs)
        self.model_config = config if isinstance(config, ModelConfig) else ModelConfig(**config)
        self.vocabulary = Vocabulary(vocabulary)
        if len(self.vocabulary) != self.model_config.vocab_size:
            raise ValueError(
                f"vocabulary has {len(self.vocabulary)} words, config says {self.model_config.vocab_size}"
            )
        c = self.model_config
        self.encoder = CNNEncoder(
            c.encoder_dim,
            c.feature_dim,
            c.num_locations if c.location_embedding else None,
            name="encoder",
        )
        self.decoder = _build_decoder(c)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.penalty_tracker = keras.metrics.Mean(name="attention_penalty")
        self.accuracy_tracker = keras.metrics.Mean(name="token_accuracy")

    def build(self, input_shape=None):
        c = self.model_config
        self.encoder.build((None, c.num_locations, c.feature_dim))
        self.decoder.build()
        self.built = True

    def call(self, inputs, training=False):
        """(features (B, L, F), tokens (B, T)) -> (logits (B, T, V), weights (B, T, L)).

        Several captions per image: features (n, L, F) and tokens (n, K, T) give
        logits (n * K, T, V), the encoder running once per image.
        """
        features, tokens = inputs
        if tokens.shape.rank is None:
            raise ValueError("tokens need a known rank: (B, T) or image-major (n, K, T)")
        if tokens.shape.rank == 3:
            k = tokens.shape[1]
            if k is None:
                raise ValueError("tokens (n, K, T) need a static K (captions per image)")
            tokens = tf.reshape(tokens, [-1, tf.shape(tokens)[2]])  # (n * K, T), image-major
            return self.decoder(self.encoder(features), tokens, captions_per_image=k)
        return self.decoder(self.encoder(features), tokens)

    def figures(self, data, training: bool, global_tokens=None, global_rows=None):
        """(loss, ce, attention penalty, token accuracy) of one teacher-forced batch.

        The one loss of both training engines. `global_tokens` / `global_rows`
        make it a replica's share of a larger global batch (`masked_loss`).
        """
        features, tokens = data
        inputs, targets = tokens[..., :-1], tokens[..., 1:]  # teacher forcing shift
        logits, weights = self((features, inputs), training=training)
        logits, weights = tf.cast(logits, tf.float32), tf.cast(weights, tf.float32)  # mixed
        targets = tf.reshape(targets, [-1, tf.shape(targets)[-1]])  # (B, T-1) in both layouts
        c = self.model_config
        loss, ce, penalty = masked_loss(
            targets, logits, weights, c.attention_penalty, c.label_smoothing,
            global_tokens, global_rows,
        )  # fmt: skip
        mask = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)
        hits = tf.cast(
            tf.equal(tf.argmax(logits, -1, output_type=targets.dtype), targets), tf.float32
        )
        counted = tf.reduce_sum(mask) if global_tokens is None else tf.maximum(global_tokens, 1.0)
        return loss, ce, penalty, tf.reduce_sum(hits * mask) / counted

    def gradients(self, data, optimizer, global_tokens=None, global_rows=None):
        """One training step's gradients and `figures`: the step function of both engines.

        `optimizer` scales the loss where it loss-scales (mixed_float16); Keras
        `fit` applies the gradients in `train_step`, the distributed loop after
        summing them across replicas.
        """
        with tf.GradientTape() as tape:
            figures = self.figures(data, True, global_tokens, global_rows)
            scaled = optimizer.scale_loss(figures[0])
        return tape.gradient(scaled, self.trainable_variables), figures

    def _update_metrics(self, loss, ce, penalty, accuracy):
        self.loss_tracker.update_state(loss)
        self.ce_tracker.update_state(ce)
        self.penalty_tracker.update_state(penalty)
        self.accuracy_tracker.update_state(accuracy)
        return {m.name: m.result() for m in self.metrics}

    def batch_metrics(self, data) -> dict[str, tf.Tensor]:
        """The `metrics` of one held-out batch, without touching the running trackers."""
        names = ("loss", "ce", "attention_penalty", "token_accuracy")
        return dict(zip(names, self.figures(data, training=False), strict=True))

    def train_step(self, data):
        grads, figures = self.gradients(data, self.optimizer)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return self._update_metrics(*figures)

    def test_step(self, data):
        return self._update_metrics(*self.figures(data, training=False))

    @property
    def metrics(self):
        return [self.loss_tracker, self.ce_tracker, self.penalty_tracker, self.accuracy_tracker]

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "config": dataclasses.asdict(self.model_config),
            "vocabulary": self.vocabulary.words,
        }


def _build_decoder(c: ModelConfig) -> AttentionGRUDecoder | TransformerDecoder:
    """The decoder `c.decoder` names, sized by `c`."""
    if c.decoder == "gru":
        return AttentionGRUDecoder(
            c.vocab_size, c.embedding_dim, c.units, c.attention_units, c.encoder_dim, name="decoder"
        )
    if c.decoder == "transformer":
        return TransformerDecoder(
            c.vocab_size,
            c.transformer_width,
            c.transformer_layers,
            c.transformer_heads,
            c.transformer_ff,
            c.transformer_dropout,
            c.encoder_dim,
            c.num_locations,
            name="decoder",
        )
    raise ValueError(f"unknown decoder {c.decoder!r}; use one of {list(DECODERS)}")


def decoder_settings(params: TrainParams) -> dict[str, Any]:
    """The ModelConfig fields that choose and size the decoder, from the train params."""
    names = ("decoder", "transformer_layers", "transformer_heads", "transformer_width")
    names += ("transformer_ff", "transformer_dropout")
    return {name: getattr(params, name) for name in names}


def build_captioner(
    config: ModelConfig, vocabulary: Vocabulary, seed: int | None = None
) -> Captioner:
    """A built (weights created) captioner; `seed` makes the initial weights reproducible."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = Captioner(config, vocabulary.words)
    model.build()
    return model


def load_captioner(path: str) -> Captioner:
    """Load a `.keras` captioner saved by the train stage."""
    model = keras.saving.load_model(path, compile=False)
    if not isinstance(model, Captioner):
        raise TypeError(f"{path} holds a {type(model).__name__}, not a Captioner")
    return model
