"""Training: batch plans, the pair budget, early stopping, callbacks and the training loop.

`loop` fits a `Captioner` on one device with Keras `fit`; `distributed` runs
the same model under tf.distribute (mirrored on one host's devices,
multi-worker from TF_CONFIG), with only the chief writing outputs.
"""
