"""Shared test setup: quiet TensorFlow, no MLflow telemetry, and the tiny captioner factory."""

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_CAPTIONS = ["a red circle at the top", "a blue square on the left"]
# Distinct sizes, so a mixed-up dimension fails loudly instead of lining up by chance.
TINY_SIZES = {"embedding_dim": 16, "units": 24, "attention_units": 20, "encoder_dim": 12}
# The unsmoothed loss with the attention penalty at weight 1: the tests' expected
# losses and training budgets assume it, whatever train's defaults are.
TINY_LOSS = {"attention_penalty": 1.0, "label_smoothing": 0.0}


@pytest.fixture(scope="session")
def tiny_captioner():
    """Factory: a built, untrained `Captioner` small enough to run in milliseconds.

    tiny_captioner(vocabulary=None, feature_shape=(9, 32), seed=0, **config)
    `vocabulary` defaults to TINY_CAPTIONS' words; `feature_shape` is the
    feature store's (locations, channels); `config` overrides any ModelConfig
    field (TINY_SIZES, TINY_LOSS, the extractor fields, ...).
    """
    # Imported here: test modules without a model do not pay for TensorFlow.
    from captioning.model import ModelConfig, build_captioner
    from captioning.text import Vocabulary

    def build(vocabulary=None, feature_shape=(9, 32), *, seed=0, **config):
        if vocabulary is None:
            vocabulary = Vocabulary.build(TINY_CAPTIONS, 50)
        num_locations, feature_dim = feature_shape
        settings = {**TINY_SIZES, **TINY_LOSS, **config}
        model_config = ModelConfig(
            vocab_size=len(vocabulary),
            feature_dim=feature_dim,
            num_locations=num_locations,
            **settings,
        )
        return build_captioner(model_config, vocabulary, seed=seed)

    return build
