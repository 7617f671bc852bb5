"""The transformer decoder: causal mask, cached decoding, layers' configs, training, serving.

Fast tests build tiny transformer captioners through the shared
`tiny_captioner` factory (`decoder="transformer"`): the whole-sequence call
sees no future token, word-by-word decoding with key/value caches gives the
whole-sequence logits and attention, and the training step lowers the loss
under XLA. Greedy, beam, sampling and save/load are tested for both decoders
in tests/test_decode.py. The slow tests serve a tiny transformer captioner
with the real `mlflow models serve` and run the pipeline with it.
"""

from __future__ import annotations

import base64
import json

import keras
import mlflow
import numpy as np
import pytest
import requests
import tensorflow as tf
from benchmarks.scoring_server import ScoringServer

from captioning.data.text import START_ID
from captioning.model.captioner import Captioner, load_captioner
from captioning.model.decode import CaptionDecoder
from captioning.model.transformer import (
    CachedMultiHeadAttention,
    TransformerDecoder,
    TransformerDecoderBlock,
)

CAPTIONS = ["a red circle at the top", "a blue square on the left", "a green star in the center"]
# Distinct sizes, so a mixed-up dimension fails loudly: 2 blocks of width 16 in 2 heads.
TINY_TRANSFORMER = {
    "decoder": "transformer",
    "transformer_layers": 2,
    "transformer_heads": 2,
    "transformer_width": 16,
    "transformer_ff": 24,
    "transformer_dropout": 0.0,
}


def batch(n=4, t=7, seed=0, vocab_size=14):
    """Features (n, 9, 32) and tokens (n, t) for the `tiny_captioner` defaults."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 9, 32)).astype(np.float32)
    tokens = rng.integers(4, vocab_size, size=(n, t)).astype(np.int32)
    tokens[:, 0] = START_ID
    return features, tokens


@pytest.mark.parametrize(
    "layer",
    [
        CachedMultiHeadAttention(16, 2),
        TransformerDecoderBlock(16, 2, 24, 0.1, 16),
        TransformerDecoder(30, 16, 2, 2, 24, 0.1, 12, 9),
    ],
)
def test_layers_round_trip_their_config(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert keras.saving.get_registered_object(f"captioning>{type(layer).__name__}") is type(layer)


def test_config_picks_the_decoder(tiny_captioner):
    assert isinstance(tiny_captioner(**TINY_TRANSFORMER).decoder, TransformerDecoder)
    with pytest.raises(ValueError, match="unknown decoder 'lstm'"):
        tiny_captioner(decoder="lstm")


def test_a_config_saved_without_a_decoder_key_is_a_gru(tiny_captioner):
    model = tiny_captioner()
    config = model.get_config()
    legacy = {k: v for k, v in config["config"].items() if k != "decoder"}
    assert type(Captioner.from_config({**config, "config": legacy}).decoder).__name__ == (
        "AttentionGRUDecoder"
    )


def test_a_future_token_does_not_change_earlier_positions(tiny_captioner):
    model = tiny_captioner(**TINY_TRANSFORMER)
    features, tokens = batch()
    logits, weights = model((features, tokens))
    changed = tokens.copy()
    changed[:, 4] = (changed[:, 4] + 1 - 4) % 10 + 4  # another word at position 4
    new_logits, new_weights = model((features, changed))
    np.testing.assert_allclose(new_logits[:, :4], logits[:, :4], atol=1e-5)
    np.testing.assert_allclose(new_weights[:, :4], weights[:, :4], atol=1e-6)
    assert np.abs(new_logits[:, 4:] - logits[:, 4:]).max() > 1e-3  # and it does change later ones


def test_cached_decoding_equals_the_whole_sequence_call(tiny_captioner):
    model = tiny_captioner(**TINY_TRANSFORMER)
    features, tokens = batch()
    logits, weights = model((features, tokens))  # (B, T, V), (B, T, L)
    decoder = model.decoder
    memory, state = decoder.start_decoding(model.encoder(features))
    for t in range(tokens.shape[1]):
        step_logits, state, step_weights = decoder.decode_step(tokens[:, t], state, memory)
        assert state[0][0].shape == (4, 2, t + 1, 8)  # one more cached position per word
        np.testing.assert_allclose(step_logits.numpy(), logits[:, t].numpy(), atol=1e-4)
        np.testing.assert_allclose(step_weights.numpy(), weights[:, t].numpy(), atol=1e-5)
    np.testing.assert_allclose(weights.numpy().sum(-1), 1.0, rtol=1e-5)


def test_several_captions_per_image_share_the_image_keys(tiny_captioner):
    model = tiny_captioner(**TINY_TRANSFORMER)
    features, tokens = batch(n=4)
    grouped_logits, grouped_weights = model((features[:2], tokens.reshape(2, 2, -1)))
    logits, weights = model((np.repeat(features[:2], 2, axis=0), tokens))
    np.testing.assert_allclose(grouped_logits, logits, atol=1e-5)
    np.testing.assert_allclose(grouped_weights, weights, atol=1e-6)


def test_dropout_acts_in_training_only(tiny_captioner):
    model = tiny_captioner(**{**TINY_TRANSFORMER, "transformer_dropout": 0.5})
    features, tokens = batch()
    first, _ = model((features, tokens))
    again, _ = model((features, tokens))
    training, _ = model((features, tokens), training=True)
    np.testing.assert_array_equal(first, again)
    assert np.abs(training - first).max() > 1e-3


@pytest.mark.parametrize("decoder", ["gru", "transformer"])
@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_a_fresh_decoder_captions_a_single_image(tiny_captioner, decoder, method):
    """The first trace sees a static batch of 1 (a served request): the loop states must fit it."""
    model = tiny_captioner(**{**TINY_TRANSFORMER, "decoder": decoder})
    features, _ = batch(n=1)
    result = CaptionDecoder(model).decode(features, method, max_len=5)
    assert result.tokens.shape == (1, 5) and result.attention.shape == (1, 5, 9)


def test_xla_training_step_lowers_the_loss(tiny_captioner):
    model = tiny_captioner(**TINY_TRANSFORMER)
    features, tokens = batch(n=8, seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=True)
    history = model.fit(
        tf.data.Dataset.from_tensors((features.astype(np.float16), tokens)).repeat(30),
        verbose=0,
        epochs=2,
    ).history
    assert history["loss"][-1] < history["loss"][0]
    assert 0.0 < history["attention_penalty"][-1] < 1.0  # the last block's cross-attention


# ----------------------------------------------------------------------------- the real server


@pytest.mark.slow
def test_served_transformer_answers_over_http_like_the_library(tmp_path, demo_trained_captioner):
    from captioning.serving.inference import ImageCaptioner
    from captioning.serving.pyfunc import ServingConfig, captioner_model_kwargs

    model_path, images = demo_trained_captioner(
        tmp_path, epochs=5, train_images=12, val_images=3, encoder_dim=16, **TINY_TRANSFORMER
    )
    expected = ImageCaptioner(model_path).caption_files(images, max_len=24)
    served_dir = tmp_path / "served"
    mlflow.pyfunc.save_model(
        str(served_dir), **captioner_model_kwargs(model_path, ServingConfig(max_batch=4))
    )
    encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in images]
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with ScoringServer(str(served_dir), env=env, log_path=tmp_path / "server.log") as server:
        url = f"{server.url}/invocations"
        served = requests.post(
            url, json={"inputs": encoded, "params": {"max_length": 24}}, timeout=120
        )
        assert served.status_code == 200, served.text
        predictions = served.json()["predictions"]
        assert [p["caption"] for p in predictions] == expected.captions
        np.testing.assert_allclose([p["score"] for p in predictions], expected.scores, rtol=1e-4)
        beam = requests.post(
            url,
            json={
                "inputs": encoded[:1],
                "params": {"decoder": "beam", "beam_size": 3, "return_attention": True},
            },
            timeout=120,
        )
        assert beam.status_code == 200, beam.text
        (row,) = beam.json()["predictions"]
        assert len(row["attention"]) == len(row["words"]) == len(row["caption"].split())
        assert all(len(w) == 64 for w in row["attention"])  # the 8x8 grid per word
        np.testing.assert_allclose(np.sum(row["attention"], axis=1), 1.0, atol=1e-4)


# ----------------------------------------------------------------------------- the pipeline

# The tiny pipeline's sizes for the transformer (pipeline_fixtures.TINY_PARAMS sizes the GRU).
TINY_PIPELINE_TRANSFORMER = {
    "train.transformer_layers": 1,
    "train.transformer_heads": 2,
    "train.transformer_width": 16,
    "train.transformer_ff": 32,
}


@pytest.mark.slow
def test_dvc_exp_run_with_the_transformer_decoder(tmp_path):
    """`dvc exp run -S train.decoder=transformer` trains, evaluates, reports and registers it."""
    from pipeline_fixtures import make_project

    project = make_project(tmp_path, TINY_PIPELINE_TRANSFORMER)
    project.dvc("exp", "run", "-S", "train.decoder=transformer")
    model = load_captioner(str(project.root / "models" / "captioner.keras"))
    assert isinstance(model.decoder, TransformerDecoder)
    assert (model.model_config.transformer_width, model.model_config.num_locations) == (16, 64)
    metrics = json.loads((project.root / "reports" / "metrics.json").read_text())
    for name in ("BLEU-4", "CIDEr", "object_accuracy", "grounding"):
        assert isinstance(metrics[name], float), (name, metrics)
    page = (project.root / "reports" / "attention" / "index.html").read_text()
    assert "last block's cross-attention" in page
    registered = json.loads((project.root / "reports" / "registered.json").read_text())
    run = mlflow.MlflowClient(project.tracking_uri).get_run(registered["run_id"])
    assert run.data.params["train.decoder"] == "transformer"
