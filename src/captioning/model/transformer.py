"""The transformer decoder: the captioner's second decoder, beside the attention GRU.

Word embedding plus sinusoidal position, then N pre-norm blocks of causal
self-attention, cross-attention over the encoded image locations and a
feed-forward layer, then a final layer norm and the vocabulary projection
(`train.decoder: transformer`). It reads the same `CNNEncoder` output as the
GRU, and speaks the same two interfaces to the rest of the project:
`call` runs teacher forcing over whole sequences for the `Captioner`'s
training step and returns (logits (B, T, V), attention (B, T, L)), and
`start_decoding` / `decode_step` advance one word at a time for
`captioning.model.decode`. Decoding keeps each block's self-attention keys and
values in a cache that grows by one position per word, and computes the
image's cross-attention keys and values once per image, so a word costs one
position, not the whole prefix again. The attention it reports (what the
loss's coverage penalty, the report's overlays and the grounding metric read)
is the last block's cross-attention, averaged over heads.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers

PACKAGE = "captioning"
# Added to the scores of future positions: finite, so a row is never all -inf (NaN).
_MASKED = -1e9


def sinusoid_positions(positions, width: int):
    """(T,) int positions -> (T, width) float32 sin/cos codes (Vaswani et al. 2017).

    Fixed rather than learned, so decoding may run past the longest training
    caption (the served model allows more words than tokenize.max_len).
    """
    half = width // 2
    rates = tf.exp(-math.log(10000.0) * tf.range(half, dtype=tf.float32) / half)  # (W/2,)
    angles = tf.cast(positions, tf.float32)[:, None] * rates[None, :]  # (T, W/2)
    return tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1)  # (T, W)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CachedMultiHeadAttention(layers.Layer):
    """Multi-head scaled dot-product attention with keys and values exposed for caching.

    `keys_values` projects a source once; `attend` scores queries against
    given keys and values, so a decoder can keep them between words.
    Returns (output (B, T, W), weights (B, H, T, S)).
    """

    def __init__(self, width: int, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        if width % num_heads:
            raise ValueError(f"width {width} is not a multiple of {num_heads} heads")
        self.width = width
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.query = layers.Dense(width, name="query")
        self.key = layers.Dense(width, name="key")
        self.value = layers.Dense(width, name="value")
        self.output_projection = layers.Dense(width, name="output")

    def build(self, query_shape=None, source_shape=None):
        source_dim = source_shape[-1] if source_shape else self.width
        self.query.build((None, None, self.width))
        self.key.build((None, None, source_dim))
        self.value.build((None, None, source_dim))
        self.output_projection.build((None, None, self.width))

    def _heads(self, x):
        """(B, S, W) -> (B, H, S, W/H)."""
        shape = tf.shape(x)
        x = tf.reshape(x, [shape[0], shape[1], self.num_heads, self.head_dim])
        return tf.transpose(x, [0, 2, 1, 3])

    def keys_values(self, source):
        """Source (B, S, D) -> keys, values (B, H, S, W/H)."""
        return self._heads(self.key(source)), self._heads(self.value(source))

    def attend(self, query_input, keys, values, mask=None):
        """Queries from (B, T, W) against (B, H, S, W/H) keys/values; mask (T, S) bool, True = seen."""
        queries = self._heads(self.query(query_input))  # (B, H, T, W/H)
        scores = tf.matmul(queries, keys, transpose_b=True) / math.sqrt(self.head_dim)
        scores = tf.cast(scores, tf.float32)  # (B, H, T, S); softmax in float32
        if mask is not None:
            scores = tf.where(mask, scores, _MASKED)
        weights = tf.nn.softmax(scores, axis=-1)  # (B, H, T, S)
        mixed = tf.matmul(tf.cast(weights, values.dtype), values)  # (B, H, T, W/H)
        mixed = tf.transpose(mixed, [0, 2, 1, 3])  # (B, T, H, W/H)
        shape = tf.shape(mixed)
        mixed = tf.reshape(mixed, [shape[0], shape[1], self.width])  # (B, T, W)
        return self.output_projection(mixed), weights

    def call(self, query_input, source, mask=None):
        keys, values = self.keys_values(source)
        return self.attend(query_input, keys, values, mask)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerDecoderBlock(layers.Layer):
    """Pre-norm block: x + SelfAttention(LN x), + CrossAttention(LN x, image), + FF(LN x).

    Dropout acts on each branch's output before it joins the residual stream.
    """

    def __init__(
        self, width: int, num_heads: int, ff_dim: int, dropout: float, memory_dim: int, **kwargs
    ):
        super().__init__(**kwargs)
        self.width = width
        self.num_heads = num_heads
        self.ff_dim = ff_dim
        self.dropout_rate = dropout
        self.memory_dim = memory_dim
        self.self_norm = layers.LayerNormalization(epsilon=1e-5, name="self_norm")
        self.self_attention = CachedMultiHeadAttention(width, num_heads, name="self_attention")
        self.cross_norm = layers.LayerNormalization(epsilon=1e-5, name="cross_norm")
        self.cross_attention = CachedMultiHeadAttention(width, num_heads, name="cross_attention")
        self.ff_norm = layers.LayerNormalization(epsilon=1e-5, name="ff_norm")
        self.ff_inner = layers.Dense(ff_dim, activation="gelu", name="ff_inner")
        self.ff_outer = layers.Dense(width, name="ff_outer")
        self.dropout = layers.Dropout(dropout, name="dropout")

    def build(self, input_shape=None):
        for norm in (self.self_norm, self.cross_norm, self.ff_norm):
            norm.build((None, None, self.width))
        self.self_attention.build((None, None, self.width), (None, None, self.width))
        self.cross_attention.build((None, None, self.width), (None, None, self.memory_dim))
        self.ff_inner.build((None, None, self.width))
        self.ff_outer.build((None, None, self.ff_dim))

    def _after_self_attention(self, x, attended, memory_kv, training):
        """The residual add, cross-attention and feed-forward: (x, cross weights (B, H, T, L))."""
        x = x + self.dropout(attended, training=training)
        crossed, weights = self.cross_attention.attend(self.cross_norm(x), *memory_kv)
        x = x + self.dropout(crossed, training=training)
        x = x + self.dropout(self.ff_outer(self.ff_inner(self.ff_norm(x))), training=training)
        return x, weights

    def call(self, x, memory_kv, training=None):
        """Whole sequences: x (B, T, W), memory_kv this block's image keys/values -> x, weights."""
        length = tf.shape(x)[1]
        causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)  # (T, T)
        normed = self.self_norm(x)
        keys, values = self.self_attention.keys_values(normed)
        attended, _ = self.self_attention.attend(normed, keys, values, causal)
        return self._after_self_attention(x, attended, memory_kv, training)

    def step(self, x, cache, memory_kv):
        """One new position: x (B, 1, W), cache (keys, values) (B, H, t, W/H) -> x, cache, weights.

        The new position's key and value join the cache; every cached position
        is in the past, so no mask is needed.
        """
        normed = self.self_norm(x)
        new_keys, new_values = self.self_attention.keys_values(normed)  # (B, H, 1, W/H)
        keys = tf.concat([cache[0], new_keys], axis=2)  # (B, H, t + 1, W/H)
        values = tf.concat([cache[1], new_values], axis=2)
        attended, _ = self.self_attention.attend(normed, keys, values)
        x, weights = self._after_self_attention(x, attended, memory_kv, training=False)
        return x, (keys, values), weights

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "num_heads": self.num_heads,
            "ff_dim": self.ff_dim,
            "dropout": self.dropout_rate,
            "memory_dim": self.memory_dim,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerDecoder(layers.Layer):
    """Embedding + positions -> N decoder blocks over the image -> LN -> logits.

    The encoded image (B, L, E) gets a learned vector per location before the
    blocks read it: cross-attention alone cannot tell locations apart, and the
    demo captions name where each object is.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        num_layers: int,
        num_heads: int,
        ff_dim: int,
        dropout: float,
        encoder_dim: int,
        num_locations: int,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if width % 2:
            raise ValueError(f"transformer width {width} must be even (sin/cos position codes)")
        self.vocab_size = vocab_size
        self.width = width
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ff_dim = ff_dim
        self.dropout_rate = dropout
        self.encoder_dim = encoder_dim
        self.num_locations = num_locations
        self.embedding = layers.Embedding(vocab_size, width, name="embedding")
        self.embedding_dropout = layers.Dropout(dropout, name="embedding_dropout")
        self.blocks = [
            TransformerDecoderBlock(width, num_heads, ff_dim, dropout, width, name=f"block_{i}")
            for i in range(num_layers)
        ]
        self.memory_projection = layers.Dense(width, name="memory_projection")
        self.final_norm = layers.LayerNormalization(epsilon=1e-5, name="final_norm")
        self.logits = layers.Dense(vocab_size, name="logits")

    def build(self, features_shape=None, tokens_shape=None):
        self.embedding.build((None,))
        self.memory_projection.build((None, None, self.encoder_dim))
        self.location = self.add_weight(
            shape=(self.num_locations, self.width),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="location",
        )
        for block in self.blocks:
            block.build()
        self.final_norm.build((None, None, self.width))
        self.logits.build((None, None, self.width))

    # -- shared by training and decoding ---------------------------------------------
    def image_memory(self, encoded):
        """Every block's cross-attention (keys, values) of the image: once per image."""
        memory = self.memory_projection(encoded)  # (B, L, W)
        # Cast: decoding calls this outside `call`, where Keras does not autocast variables.
        memory = memory + tf.cast(self.location, memory.dtype)
        return tuple(block.cross_attention.keys_values(memory) for block in self.blocks)

    def _embed(self, tokens, positions):
        """tokens (B, T), positions (T,) -> (B, T, W), the embedding scaled to the codes' size."""
        embedded = self.embedding(tokens) * math.sqrt(self.width)
        return embedded + tf.cast(sinusoid_positions(positions, self.width), embedded.dtype)

    def _read_out(self, x, weights):
        """Last hidden states -> logits; the last block's heads averaged -> attention."""
        return self.logits(self.final_norm(x)), tf.reduce_mean(weights, axis=1)

    # -- teacher forcing ---------------------------------------------------------------
    def call(self, features, tokens, captions_per_image: int | None = None, training=None):
        """features (B, L, E), tokens (B, T) -> logits (B, T, V), attention (B, T, L).

        With `captions_per_image` K, features are (n, L, E) and tokens (n * K, T),
        image-major: the image's keys and values are computed once per image,
        then repeated for its K captions.
        """
        memory = self.image_memory(features)
        if captions_per_image:
            memory = tf.nest.map_structure(
                lambda m: tf.repeat(m, captions_per_image, axis=0), memory
            )
        x = self._embed(tokens, tf.range(tf.shape(tokens)[1]))
        x = self.embedding_dropout(x, training=training)
        for block, memory_kv in zip(self.blocks, memory, strict=True):
            x, weights = block(x, memory_kv, training=training)
        return self._read_out(x, weights)

    # -- word by word (captioning.model.decode) ----------------------------------------------
    def start_decoding(self, encoded, copies: int = 1):
        """(memory, state) before the first word; every row repeated `copies` times (beams).

        memory: per block, the image's cross-attention keys and values.
        state: per block, the self-attention (keys, values) so far, (B, H, 0, W/H).
        """
        memory = self.image_memory(encoded)
        if copies > 1:
            memory = tf.nest.map_structure(lambda m: tf.repeat(m, copies, axis=0), memory)
        empty = tf.zeros_like(memory[0][0][:, :, :0, :])  # (B, H, 0, W/H)
        state = tuple((empty, empty) for _ in self.blocks)
        return memory, state

    def decode_step(self, tokens, state, memory):
        """tokens (B,) at position t = the cache length -> logits (B, V), state, attention (B, L)."""
        position = tf.shape(state[0][0])[2]
        x = self._embed(tokens[:, None], position[None])  # (B, 1, W)
        caches = []
        for block, cache, memory_kv in zip(self.blocks, state, memory, strict=True):
            x, cache, weights = block.step(x, cache, memory_kv)
            caches.append(cache)
        logits, attention = self._read_out(x, weights)
        return logits[:, 0], tuple(caches), attention[:, 0]

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "width": self.width,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "ff_dim": self.ff_dim,
            "dropout": self.dropout_rate,
            "encoder_dim": self.encoder_dim,
            "num_locations": self.num_locations,
        }
