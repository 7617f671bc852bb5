"""Training: batch plans, the pair budget, early stopping, checkpoints, callbacks, two loops.

`fit` trains a `Captioner` on one device with Keras `fit` (the default);
`distributed` runs the same model under tf.distribute (mirrored on one host's
devices, multi-worker from TF_CONFIG, or mixed precision) with an epoch loop of
its own, only the chief writing outputs. Both take their model, optimiser,
step function, batches, budget, checkpoint and callbacks from the other
modules here (`engine` holds what only they share), and know no data set: a
source's own scores arrive as a `captioning.data.scorers.SourceScorer`.
"""
