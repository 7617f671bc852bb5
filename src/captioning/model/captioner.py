"""The captioning model: `ModelConfig` and the `Captioner` (encoder + decoder + trainer).

The tutorial's design ("show, attend and tell" in TensorFlow's docs), rebuilt for
Keras 3: the `Captioner` joins `encoder.CNNEncoder` to the decoder that
`train.decoder` names (`gru_decoder.AttentionGRUDecoder`, or
`transformer.TransformerDecoder` over the same encoder, loss and training step)
and trains with teacher forcing on `loss.masked_loss`; both decoders offer
`start_decoding` / `decode_step` to `captioning.model.decode`. The `Captioner`
carries its `ModelConfig` and its vocabulary, so a saved `.keras` file is all
that inference needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import tensorflow as tf

from captioning.config import FeaturesParams, TrainParams
from captioning.data.text import PAD_ID, Vocabulary
from captioning.model.encoder import CNNEncoder
from captioning.model.gru_decoder import AttentionGRUDecoder
from captioning.model.loss import masked_loss
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
