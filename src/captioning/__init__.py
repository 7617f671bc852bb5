"""Show, attend and tell image captioning as a reproducible DVC + MLflow project.

The library behind the pipeline's stages, one subpackage per job, layered so
that each imports only those above it in this list:

- `config`, `atomic_files`, `server_process`: typed params, atomic writes,
  server processes (used everywhere)
- `data`: sources, downloads, the one image reader, text, validation
- `features`: InceptionV3 extraction into a sharded store
- `model`: encoder, attention GRU, transformer, decoding
- `evaluation`: coco-caption scorers, split evaluation, report, gate, CI comment
- `training`: batches, budget, stopping, callbacks, one device or tf.distribute
- `tracking`: MLflow helpers and the team server
- `serving`: the pyfunc model, registry, inference
- `cli`: the `captioning` command

Importing it does no work.
"""

__version__ = "0.1.0"
