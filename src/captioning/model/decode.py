"""Batched decoding: greedy, sampling with temperature, and beam search.

The one place that turns image features into captions; evaluate, reports, the
CLI and the served model all call `CaptionDecoder.decode`. Each method runs its
whole time loop inside one `tf.function` (a graph `while` loop over a batch of
images) that stops as soon as every caption in the batch has ended. On CPU the
per-word matmuls are what a batch shares, so batches are several times cheaper
per caption than single images, not free (`make bench` measures it). All
methods return the caption, its log-probability score and the 8x8 (64)
attention weights of every emitted word.

The loops drive either decoder (`train.decoder`) through the same two calls:
`start_decoding(encoded, copies)` gives the per-batch constants ("memory") and
the first loop state, and `decode_step(tokens, state, memory)` one word. The
state is the GRU's hidden vector, or the transformer's per-block key/value
caches that grow by one position a word; beam search reorders either with its
beams, row by row.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from captioning.config import DecoderMethod, EvaluateParams
from captioning.data.text import END_ID, PAD_ID, START_ID
from captioning.model.captioner import Captioner


@dataclasses.dataclass
class DecodeResult:
    """Per image: ids (without <start>), caption, score, word count and attention."""

    tokens: np.ndarray  # (N, T) int32, <end> then <pad> after the caption
    captions: list[str]
    scores: np.ndarray  # (N,) sum of log-probabilities (beam: length-normalised)
    lengths: np.ndarray  # (N,) words in the caption (no <end>)
    attention: np.ndarray  # (N, T, L) float32, one map per emitted token

    def attention_for(self, i: int) -> np.ndarray:
        """(words, L): the maps for image i's words only."""
        return self.attention[i, : self.lengths[i]]


class CaptionDecoder:
    """Compiled decoding loops over one trained `Captioner`."""

    def __init__(self, model: Captioner):
        self.model = model
        self.vocabulary = model.vocabulary
        self._greedy = tf.function(self._greedy_loop, reduce_retracing=True)
        self._beam = tf.function(self._beam_loop, reduce_retracing=True)

    # -- public -----------------------------------------------------------------
    def decode(
        self,
        features: np.ndarray | Sequence,
        method: DecoderMethod = EvaluateParams.decoder,
        max_len: int = EvaluateParams.max_len,
        beam_size: int = EvaluateParams.beam_size,
        temperature: float = EvaluateParams.temperature,
        length_penalty: float = 0.0,
        seed: int = 0,
        batch_size: int = EvaluateParams.batch_size,
    ) -> DecodeResult:
        """Caption `features` (N, L, F) in batches; see the module docstring for methods.

        `length_penalty` 0 ranks beams by their raw log-probability, the search
        without a length model; the evaluate stage passes its own setting.
        """
        if method not in typing.get_args(DecoderMethod):
            raise ValueError(f"unknown decoder {method!r}; use greedy, sample or beam")
        if max_len < 1:
            raise ValueError("max_len must be at least 1")
        if method == "beam" and beam_size < 1:
            raise ValueError("beam_size must be at least 1")
        if method == "sample" and temperature <= 0:
            raise ValueError("temperature must be positive")
        n = len(features)
        parts = []
        for start in range(0, n, batch_size):
            batch = tf.convert_to_tensor(np.asarray(features[start : start + batch_size]))
            if method == "beam":
                out = self._beam(
                    batch, tf.constant(max_len), beam_size, tf.constant(length_penalty, tf.float32)
                )
            else:
                out = self._greedy(
                    batch,
                    tf.constant(max_len),
                    method == "sample",
                    tf.constant(temperature, tf.float32),
                    tf.constant([seed, start], tf.int32),
                )
            parts.append([t.numpy() for t in out])
        if not parts:
            return DecodeResult(
                np.zeros((0, max_len), np.int32),
                [],
                np.zeros(0, np.float32),
                np.zeros(0, np.int32),
                np.zeros((0, max_len, 0), np.float32),
            )
        tokens, scores, attention = (np.concatenate(p) for p in zip(*parts, strict=True))
        lengths = _caption_lengths(tokens)
        captions = [self.vocabulary.decode(row) for row in tokens]
        return DecodeResult(tokens, captions, scores, lengths, attention)

    def greedy_tokens(self, features: tf.Tensor, max_len: int) -> tuple[tf.Tensor, tf.Tensor]:
        """Graph-safe greedy decoding: features (B, L, F) -> tokens (B, T), scores (B,).

        For callers compiling their own graph (`captioning.serving.savedmodel`).
        """
        tokens, scores, _ = self._greedy(
            features, tf.constant(max_len), False, tf.constant(1.0), tf.constant([0, 0])
        )
        return tokens, scores

    # -- compiled loops ---------------------------------------------------------
    def _prepare(self, features, copies: int = 1):
        """Everything a loop needs before its first word, computed once per batch.

        (decoder, encoded (B, L, E), memory, state), memory and state with
        every row repeated `copies` times (the beams of one image adjacent).
        """
        encoded = self.model.encoder(features)  # (B, L, E)
        decoder = self.model.decoder
        memory, state = decoder.start_decoding(encoded, copies)
        return decoder, encoded, memory, state

    def _greedy_loop(self, features, max_len, sample: bool, temperature, seed):
        """Argmax (greedy), or with `sample` seeded draws from softmax(logits / temperature).

        `sample` is a Python bool, so greedy traces its own graph with no
        sampling branch or seed arithmetic in the loop. The loop stops once
        every row has emitted <end>; the steps it skips would only have written
        <pad> and zero attention, which is what the outputs hold there.
        """
        decoder, encoded, memory, state = self._prepare(features)
        batch = tf.shape(features)[0]
        tokens = tf.fill([batch], START_ID)
        done = tf.zeros([batch], tf.bool)
        score = tf.zeros([batch], tf.float32)
        out_tokens = tf.TensorArray(tf.int32, size=max_len)
        out_weights = tf.TensorArray(tf.float32, size=max_len)
        t = tf.constant(0)
        while t < max_len and not tf.reduce_all(done):
            # A transformer's key/value caches grow by one position a word.
            tf.autograph.experimental.set_loop_options(
                shape_invariants=_loose_shapes(state, keep_batch=True)
            )
            logits, state, weights = decoder.decode_step(tokens, state, memory)
            logp = tf.nn.log_softmax(logits)  # (B, V)
            if sample:
                step_seed = tf.stack([seed[0], seed[1] * 100003 + t])
                chosen = tf.random.stateless_categorical(
                    logits / temperature, 1, seed=step_seed, dtype=tf.int32
                )[:, 0]
            else:
                chosen = tf.argmax(logits, axis=-1, output_type=tf.int32)
            chosen = tf.where(done, PAD_ID, chosen)
            score += tf.where(done, 0.0, tf.gather(logp, chosen, batch_dims=1))
            out_tokens = out_tokens.write(t, chosen)
            out_weights = out_weights.write(t, tf.where(done[:, None], 0.0, weights))
            done = done | tf.equal(chosen, END_ID)
            tokens = chosen
            t += 1
        pad, no_weights = tf.fill([batch], PAD_ID), tf.zeros_like(encoded[:, :, 0])  # (B,), (B, L)
        while t < max_len:
            out_tokens = out_tokens.write(t, pad)
            out_weights = out_weights.write(t, no_weights)
            t += 1
        return (
            tf.transpose(out_tokens.stack()),  # (B, T)
            score,
            tf.transpose(out_weights.stack(), [1, 0, 2]),  # (B, T, L)
        )

    def _beam_loop(self, features, max_len, beam_size: int, length_penalty):
        """Batched beam search over B images x K beams, flattened to B*K rows.

        Finished beams (those that emitted <end>) may only extend with <pad> at
        zero cost, so they keep their score while unfinished ones compete;
        beams still open at max_len are capped there. The final pick divides
        each beam's log-probability by length ** length_penalty (0 = none).
        With K = 1 this is exactly greedy decoding. Once every beam is
        finished, further steps would only append <pad> at zero cost (top_k
        keeps the beams in order), so the loop stops and pads instead.
        """
        k = beam_size
        decoder, encoded, memory, state = self._prepare(features, copies=k)  # B*K rows
        batch = tf.shape(features)[0]
        vocab = self.model.model_config.vocab_size
        num_loc = tf.shape(encoded)[1]
        # Only beam 0 is live at the start, or the K beams would be K copies.
        scores = tf.tile(tf.concat([[0.0], tf.fill([k - 1], -1e9)], 0)[None], [batch, 1])  # (B, K)
        tokens = tf.fill([batch * k], START_ID)
        done = tf.zeros([batch, k], tf.bool)
        lengths = tf.zeros([batch, k], tf.int32)
        history = tf.zeros([batch, k, 0], tf.int32)
        att_history = tf.zeros([batch, k, 0, num_loc], tf.float32)
        pad_only = tf.one_hot(PAD_ID, vocab, on_value=0.0, off_value=-1e9)  # (V,)
        while tf.shape(history)[2] < max_len and not tf.reduce_all(done):
            tf.autograph.experimental.set_loop_options(
                shape_invariants=[
                    (history, tf.TensorShape([None, k, None])),
                    (att_history, tf.TensorShape([None, k, None, None])),
                    # Gathers lose the static batch size a caller's tensor may carry.
                    *_loose_shapes(state),
                    (tokens, tf.TensorShape([None])),
                    (scores, tf.TensorShape([None, k])),
                    (done, tf.TensorShape([None, k])),
                    (lengths, tf.TensorShape([None, k])),
                ]
            )
            logits, state, weights = decoder.decode_step(tokens, state, memory)
            logp = tf.reshape(tf.nn.log_softmax(logits), [batch, k, vocab])
            logp = tf.where(done[..., None], pad_only, logp)
            total = tf.reshape(scores[..., None] + logp, [batch, k * vocab])
            scores, flat = tf.math.top_k(total, k=k)  # (B, K); ties -> lower index, as argmax
            parent = flat // vocab
            chosen = flat % vocab
            history = tf.concat([tf.gather(history, parent, batch_dims=1), chosen[..., None]], -1)
            weights = tf.gather(tf.reshape(weights, [batch, k, -1]), parent, batch_dims=1)
            was_done = tf.gather(done, parent, batch_dims=1)
            weights = tf.where(was_done[..., None], 0.0, weights)
            att_history = tf.concat(
                [tf.gather(att_history, parent, batch_dims=1), weights[:, :, None]], 2
            )
            lengths = tf.gather(lengths, parent, batch_dims=1) + tf.cast(~was_done, tf.int32)
            done = was_done | tf.equal(chosen, END_ID)
            rows = tf.reshape(parent + tf.range(batch)[:, None] * k, [-1])
            state = tf.nest.map_structure(lambda s, rows=rows: tf.gather(s, rows), state)
            tokens = tf.reshape(chosen, [-1])
        missing = max_len - tf.shape(history)[2]  # steps skipped after every beam finished
        history = tf.pad(history, [[0, 0], [0, 0], [0, missing]], constant_values=PAD_ID)
        att_history = tf.pad(att_history, [[0, 0], [0, 0], [0, missing], [0, 0]])
        normalised = scores / tf.pow(tf.cast(tf.maximum(lengths, 1), tf.float32), length_penalty)
        best = tf.argmax(normalised, axis=-1, output_type=tf.int32)  # (B,)
        return (
            tf.gather(history, best, batch_dims=1),
            tf.gather(normalised, best, batch_dims=1),
            tf.gather(att_history, best, batch_dims=1),
        )


def _loose_shapes(state, keep_batch: bool = False) -> list[tuple]:
    """The shape invariant of a (nested) loop state: each rank kept, its dimensions free.

    `keep_batch` keeps the first (batch) dimension as it is, so the loop's
    outputs keep a caller's static batch size.
    """

    def loose(s):
        batch = s.shape[:1] if keep_batch else [None]
        return tf.TensorShape([*batch, *[None] * (s.shape.rank - 1)])

    return [(state, tf.nest.map_structure(loose, state))]


def _caption_lengths(tokens: np.ndarray) -> np.ndarray:
    """Words before the first <end> or <pad> in each row."""
    stop = (tokens == END_ID) | (tokens == PAD_ID)
    return np.where(stop.any(axis=1), stop.argmax(axis=1), tokens.shape[1]).astype(np.int32)
