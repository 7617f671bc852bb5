"""The Keras model: serialisation, teacher forcing consistency, loss and training."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioning.data.text import PAD_ID, Vocabulary
from captioning.model.captioner import ModelConfig, build_captioner, load_captioner
from captioning.model.encoder import CNNEncoder
from captioning.model.gru_decoder import AttentionGRUDecoder, BahdanauAttention
from captioning.model.loss import masked_loss


def batch(n=4, t=7, seed=0, vocab_size=14):
    """Features (n, 9, 32) and tokens (n, t) for the `tiny_captioner` defaults."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 9, 32)).astype(np.float16)
    tokens = rng.integers(4, vocab_size, size=(n, t)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[0, 4:] = PAD_ID
    return features, tokens


@pytest.mark.parametrize(
    "layer",
    [
        CNNEncoder(12, 32),
        BahdanauAttention(20),
        AttentionGRUDecoder(30, 16, 24, 20, 12),
    ],
)
def test_layers_round_trip_their_config(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert keras.saving.get_registered_object(f"captioning>{type(layer).__name__}") is type(layer)


def test_attention_returns_context_and_normalised_weights():
    attention = BahdanauAttention(8)
    features = tf.random.normal((3, 9, 5))
    context, weights = attention(features, tf.random.normal((3, 8)))
    assert context.shape == (3, 5) and weights.shape == (3, 9)
    np.testing.assert_allclose(weights.numpy().sum(-1), 1.0, rtol=1e-5)


def test_whole_sequence_call_matches_word_by_word_steps(tiny_captioner):
    model = tiny_captioner()
    features, tokens = batch()
    logits, weights = model((features, tokens))
    encoded = model.encoder(features)
    decoder = model.decoder
    projected = decoder.attention.project_features(encoded)
    state = decoder.initial_state(encoded)
    for t in range(tokens.shape[1]):
        step_logits, state, step_weights = decoder.step(tokens[:, t], state, encoded, projected)
        np.testing.assert_allclose(step_logits.numpy(), logits[:, t].numpy(), atol=1e-4)
        np.testing.assert_allclose(step_weights.numpy(), weights[:, t].numpy(), atol=1e-5)


def test_fused_recurrence_is_keras_attention_then_gru_cell(tiny_captioner):
    """The decoder's hand-fused step computes exactly attention + Keras' GRUCell on [context, word]."""
    model = tiny_captioner()
    features, tokens = batch()
    decoder = model.decoder
    encoded = model.encoder(features)
    projected = decoder.attention.project_features(encoded)
    state = decoder.initial_state(encoded) + tf.random.normal((4, 24), seed=1)
    context, weights = decoder.attention(encoded, state)
    x = tf.concat([context, decoder.embedding(tokens[:, 2])], axis=-1)
    _, [expected] = decoder.gru(x, [state])
    logits, got, got_weights = decoder.step(tokens[:, 2], state, encoded, projected)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_weights.numpy(), weights.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        logits.numpy(), decoder.fc2(decoder.fc1(expected)).numpy(), atol=1e-5
    )


def test_location_embedding_tells_identical_locations_apart(tmp_path, tiny_captioner):
    model = tiny_captioner(location_embedding=True)
    same = np.ones((1, 9, 32), dtype=np.float16)  # every location sees the same feature
    encoded = model.encoder(same).numpy()[0]
    assert not np.allclose(encoded[0], encoded[1])
    plain = tiny_captioner()
    np.testing.assert_allclose(plain.encoder(same).numpy()[0][0], plain.encoder(same).numpy()[0][1])
    model.save(tmp_path / "m.keras")
    reloaded = load_captioner(str(tmp_path / "m.keras"))
    assert reloaded.model_config.location_embedding
    np.testing.assert_allclose(reloaded.encoder(same).numpy()[0], encoded, atol=1e-6)


def test_gru_state_is_carried_between_words(tiny_captioner):
    """Changing an early word must change later logits even with attention frozen out."""
    model = tiny_captioner()
    features, tokens = batch()
    changed = tokens.copy()
    changed[:, 1] = 5 if tokens[0, 1] != 5 else 6
    a, _ = model((features, tokens))
    b, _ = model((features, changed))
    assert not np.allclose(a[:, 3].numpy(), b[:, 3].numpy())
    np.testing.assert_allclose(a[:, 0].numpy(), b[:, 0].numpy(), atol=1e-6)


def test_masked_loss_ignores_padding_and_penalises_uneven_attention():
    targets = tf.constant([[5, 6, PAD_ID]])
    logits = tf.random.normal((1, 3, 10))
    uniform = tf.fill((1, 3, 4), 0.25)
    loss, ce, _ = masked_loss(targets, logits, uniform, 0.0)
    other = tf.concat([logits[:, :2], tf.random.normal((1, 1, 10)) * 50], axis=1)
    loss2, _, _ = masked_loss(targets, other, uniform, 0.0)
    np.testing.assert_allclose(loss.numpy(), loss2.numpy(), rtol=1e-6)
    peaked = tf.constant([[[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0]]])
    _, _, p_uniform = masked_loss(targets, logits, uniform, 1.0)
    _, _, p_peaked = masked_loss(targets, logits, peaked, 1.0)
    assert p_peaked > p_uniform


def test_label_smoothing_mixes_in_the_uniform_cross_entropy():
    targets = tf.constant([[5, 6, 2, PAD_ID]])
    logits = tf.random.stateless_normal((1, 4, 10), seed=(1, 2)) * 3
    weights = tf.fill((1, 4, 4), 0.25)
    plain, ce, _ = masked_loss(targets, logits, weights, 0.0)
    smoothed, ce_smoothed, _ = masked_loss(targets, logits, weights, 0.0, label_smoothing=0.2)
    log_p = tf.nn.log_softmax(logits).numpy()[0, :3]  # the three real tokens
    true = -log_p[np.arange(3), [5, 6, 2]].mean()
    uniform = -log_p.mean()
    np.testing.assert_allclose(plain.numpy(), true, rtol=1e-5)
    np.testing.assert_allclose(smoothed.numpy(), 0.8 * true + 0.2 * uniform, rtol=1e-5)
    # `ce` stays the plain cross-entropy, so smoothed and plain runs compare.
    np.testing.assert_allclose(ce_smoothed.numpy(), ce.numpy(), rtol=1e-6)


def test_training_lowers_loss_on_a_fixed_batch(tiny_captioner):
    model = tiny_captioner(seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    features, tokens = batch(n=8, vocab_size=len(model.vocabulary))
    ds = tf.data.Dataset.from_tensors((features, tokens)).repeat(30)
    history = model.fit(ds, epochs=1, verbose=0)
    first = model.evaluate(
        tf.data.Dataset.from_tensors((features, tokens)), verbose=0, return_dict=True
    )
    assert first["ce"] < 1.0  # 14-word vocabulary: chance is ln(14) ~ 2.6
    assert history.history["loss"][0] > first["loss"]


def test_saved_model_reloads_with_config_vocabulary_and_stats(tmp_path, tiny_captioner):
    model = tiny_captioner()
    vocab = model.vocabulary
    model.encoder.set_feature_stats(np.full(32, 0.5), np.full(32, 2.0))
    features, tokens = batch()
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = load_captioner(str(path))
    assert loaded.vocabulary == vocab
    assert loaded.model_config == model.model_config
    np.testing.assert_allclose(loaded.encoder.feature_std.numpy(), 2.0)
    np.testing.assert_allclose(
        loaded((features, tokens))[0].numpy(), model((features, tokens))[0].numpy(), atol=1e-6
    )


def test_vocabulary_size_must_match_config():
    vocab = Vocabulary.build(["a b"], 10)
    with pytest.raises(ValueError, match="vocabulary has"):
        build_captioner(ModelConfig(vocab_size=99), vocab)
