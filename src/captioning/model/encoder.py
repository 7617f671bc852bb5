"""The image encoder: InceptionV3 features standardised, then projected per location.

InceptionV3 features are standardised by train-set statistics stored in the
encoder (non-trainable weights saved with the model), so random-init features
(tiny values) train as well as ImageNet ones; a Dense + ReLU then maps each of
the feature map's locations to `encoder_dim`, optionally plus a learned
embedding of where the location is. Both decoders (`gru_decoder`,
`transformer`) read its output.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

PACKAGE = "captioning"


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
