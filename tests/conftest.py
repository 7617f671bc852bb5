"""Shared test setup: quiet TensorFlow, no MLflow telemetry, and the tiny captioner factory."""

import os
import sys

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# What MLflow's fluent API keeps per process: `mlflow.set_experiment` (called by
# `tracking.configure`) sets a module global and MLFLOW_EXPERIMENT_ID, which
# outlive the test's store and point the next test at an experiment that is gone.
_MLFLOW_ENV = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI")


def _kept_mlflow_state():
    """Snapshot MLflow's per-process state; put it back when the generator resumes."""
    with pytest.MonkeyPatch.context() as patch:
        for name in _MLFLOW_ENV:  # restored at exit, set or not
            if name in os.environ:
                patch.setenv(name, os.environ[name])
            else:
                patch.delenv(name, raising=False)
        yield
        fluent = sys.modules.get("mlflow.tracking.fluent")
        if fluent is not None:  # only where a test imported MLflow
            fluent._active_experiment_id = None


@pytest.fixture(autouse=True)
def _mlflow_state_per_test():
    """Each test ends with the process's MLflow experiment and store as it began."""
    yield from _kept_mlflow_state()


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
    from captioning.data.text import Vocabulary
    from captioning.model.captioner import ModelConfig, build_captioner

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


@pytest.fixture(scope="session")
def demo_trained_captioner(tiny_captioner):
    """Factory: a tiny captioner briefly trained on demo images at the real 299 px, saved.

    demo_trained_captioner(root, seed=0, epochs=40, train_images=16, val_images=4, **config)
    -> (the .keras path, the val2014 images): features of the seeded random-init
    InceptionV3 (64 locations), every caption of every image, `config` as for
    `tiny_captioner`. For the tests that serve a model and compare its captions.
    """
    import collections
    import json

    import keras
    import numpy as np
    import tensorflow as tf

    from captioning.data.demo import generate_demo
    from captioning.data.text import Vocabulary, clean_caption
    from captioning.features import build_extractor, weights_digest
    from captioning.features.preprocessing import preprocess_image
    from captioning.training.checkpoints import save_model

    def train(root, *, seed=0, epochs=40, train_images=16, val_images=4, **config):
        demo = root / "demo"
        generate_demo(demo, train_images, val_images, seed=3)
        annotations = json.loads((demo / "annotations" / "captions_train2014.json").read_text())
        files = {im["id"]: demo / "train2014" / im["file_name"] for im in annotations["images"]}
        captions = collections.defaultdict(list)
        for annotation in annotations["annotations"]:
            captions[annotation["image_id"]].append(clean_caption(annotation["caption"]))
        ids = sorted(files)
        extractor = build_extractor("none", 299, 0)
        pixels = np.stack([preprocess_image(files[i].read_bytes(), 299).numpy() for i in ids])
        features = extractor.predict(pixels, batch_size=8, verbose=0)  # (N, 64, 2048)
        vocab = Vocabulary.build([c for i in ids for c in captions[i]], 200)
        model = tiny_captioner(
            vocab,
            features.shape[1:],
            seed=seed,
            extractor_digest=weights_digest(extractor),
            **config,
        )
        flat = features.reshape(-1, features.shape[-1])
        model.encoder.set_feature_stats(flat.mean(0), flat.std(0))
        tokens = np.concatenate([vocab.encode_batch(captions[i], 20) for i in ids])
        repeated = np.repeat(features, [len(captions[i]) for i in ids], axis=0).astype(np.float16)
        if epochs:
            model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
            dataset = tf.data.Dataset.from_tensor_slices((repeated, tokens)).batch(16)
            model.fit(dataset, epochs=epochs, verbose=0)
        path = root / f"captioner-{seed}-{epochs}.keras"
        save_model(model, path)
        return path, sorted((demo / "val2014").glob("*.jpg"))

    return train
