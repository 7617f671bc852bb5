"""Show, attend and tell image captioning as a reproducible DVC + MLflow project.

The library behind the pipeline's stages: data sources and validation
(`captioning.data`, `captioning.validate`), InceptionV3 features
(`captioning.features`), text (`captioning.text`), the model and its training
(`captioning.model`, `captioning.training`), decoding (`captioning.decode`),
scoring (`captioning.metrics`, `captioning.evaluation`), reports and tracking.
Importing it does no work.
"""

__version__ = "0.1.0"
