"""Batched greedy, sampling and beam search on a small trained model of each decoder."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioning.data.text import END_ID, PAD_ID, START_ID, Vocabulary
from captioning.model.captioner import load_captioner
from captioning.model.decode import CaptionDecoder

CAPTIONS = ["a red circle at the top", "a blue square on the left", "a green star in the center"]
# Per decoder: model sizes and the learning rate that overfits the three captions in 150 steps.
DECODERS = {
    "gru": ({"embedding_dim": 16, "units": 32, "attention_units": 16, "encoder_dim": 16}, 2e-2),
    "transformer": (
        {
            "decoder": "transformer",
            "transformer_layers": 2,
            "transformer_heads": 2,
            "transformer_width": 16,
            "transformer_ff": 24,
            "transformer_dropout": 0.0,
            "encoder_dim": 16,
        },
        1e-2,
    ),
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def trained(request, tiny_captioner):
    """A model overfit so image k -> caption k: decoding has a known right answer."""
    sizes, learning_rate = DECODERS[request.param]
    vocab = Vocabulary.build(CAPTIONS, 50)
    model = tiny_captioner(vocab, (4, 8), **sizes)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 4, 8)).astype(np.float32) * 3
    tokens = vocab.encode_batch(CAPTIONS, 9)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=False)
    model.fit(tf.data.Dataset.from_tensors((features, tokens)).repeat(150), verbose=0)
    return model, features


def test_greedy_recovers_the_training_captions(trained):
    model, features = trained
    result = CaptionDecoder(model).decode(features, "greedy", max_len=10)
    assert result.captions == CAPTIONS
    assert list(result.lengths) == [6, 6, 6]
    assert result.attention.shape == (3, 10, 4)
    np.testing.assert_allclose(result.attention[:, :7].sum(-1), 1.0, rtol=1e-5)
    assert np.all(result.attention[:, 7:] == 0)  # nothing after <end>
    assert np.all(result.tokens[:, 6] == END_ID) and np.all(result.tokens[:, 7:] == PAD_ID)


def test_beam_of_one_is_exactly_greedy(trained):
    model, features = trained
    noisy = features + np.random.default_rng(1).normal(size=features.shape).astype(np.float32) * 2
    decoder = CaptionDecoder(model)
    greedy = decoder.decode(noisy, "greedy", max_len=10)
    beam = decoder.decode(noisy, "beam", beam_size=1, max_len=10)
    assert beam.captions == greedy.captions
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)
    np.testing.assert_allclose(beam.attention, greedy.attention, atol=1e-6)


def test_beam_finds_at_least_the_greedy_log_probability(trained):
    model, features = trained
    noisy = features + np.random.default_rng(2).normal(size=(3, 4, 8)).astype(np.float32) * 3
    decoder = CaptionDecoder(model)
    greedy = decoder.decode(noisy, "greedy", max_len=10)
    beam = decoder.decode(noisy, "beam", beam_size=4, max_len=10)
    assert np.all(beam.scores >= greedy.scores - 1e-4)


def test_each_beams_score_is_its_caption_scored_afresh(trained):
    """Beam search reorders the decoder's state (GRU state, transformer caches) with its beams."""
    model, features = trained
    noisy = features + np.random.default_rng(2).normal(size=features.shape).astype(np.float32) * 3
    beam = CaptionDecoder(model).decode(noisy, "beam", beam_size=4, max_len=10, length_penalty=0.0)
    inputs = np.concatenate([np.full((3, 1), START_ID, np.int32), beam.tokens[:, :-1]], axis=1)
    logits, weights = model((noisy, inputs))  # teacher forcing: (B, T, V), (B, T, L)
    logp = tf.nn.log_softmax(logits).numpy()
    picked = np.take_along_axis(logp, beam.tokens[..., None], axis=-1)[..., 0]  # (B, T)
    emitted = np.arange(10)[None] <= beam.lengths[:, None]  # the words and <end>
    np.testing.assert_allclose((picked * emitted).sum(1), beam.scores, atol=1e-4)
    np.testing.assert_allclose(
        beam.attention * emitted[..., None], weights.numpy() * emitted[..., None], atol=1e-5
    )


def test_saved_model_reloads_and_captions_identically(tmp_path, trained):
    model, features = trained
    model.save(tmp_path / "model.keras")
    loaded = load_captioner(str(tmp_path / "model.keras"))
    assert loaded.model_config == model.model_config
    for method in ("greedy", "beam"):
        before = CaptionDecoder(model).decode(features, method, max_len=10)
        after = CaptionDecoder(loaded).decode(features, method, max_len=10)
        assert after.captions == before.captions
        np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6)
        np.testing.assert_allclose(after.attention, before.attention, atol=1e-7)


def test_unfinished_beams_are_capped_at_max_len(trained):
    model, features = trained
    result = CaptionDecoder(model).decode(features, "beam", beam_size=3, max_len=3)
    assert list(result.lengths) == [3, 3, 3]
    assert [c.split() for c in result.captions] == [c.split()[:3] for c in CAPTIONS]


def test_batched_decoding_equals_one_image_at_a_time(trained):
    model, features = trained
    decoder = CaptionDecoder(model)
    for method in ("greedy", "beam"):
        together = decoder.decode(features, method, max_len=10, batch_size=3)
        alone = [
            decoder.decode(features[i : i + 1], method, max_len=10).captions[0] for i in range(3)
        ]
        assert together.captions == alone


def test_sampling_is_seeded_and_cold_sampling_is_greedy(trained):
    model, features = trained
    decoder = CaptionDecoder(model)
    a = decoder.decode(features, "sample", temperature=1.5, seed=7, max_len=10)
    b = decoder.decode(features, "sample", temperature=1.5, seed=7, max_len=10)
    assert a.captions == b.captions
    cold = decoder.decode(features, "sample", temperature=1e-3, seed=1, max_len=10)
    assert cold.captions == CAPTIONS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "top-k"}, "unknown decoder"),
        ({"max_len": 0}, "max_len"),
        ({"method": "beam", "beam_size": 0}, "beam_size"),
        ({"method": "sample", "temperature": 0}, "temperature"),
    ],
)
def test_bad_settings_are_rejected(trained, kwargs, message):
    model, features = trained
    with pytest.raises(ValueError, match=message):
        CaptionDecoder(model).decode(features, **kwargs)
