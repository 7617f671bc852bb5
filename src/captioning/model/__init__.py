"""The network: InceptionV3-feature encoder, Bahdanau attention GRU, transformer, decoding.

`captioner` holds the `Captioner` (encoder + either decoder, its `ModelConfig`
and vocabulary), `encoder` the feature encoder, `gru_decoder` the Bahdanau
attention GRU, `transformer` the transformer decoder that can stand in the
GRU's place, `loss` the masked loss, and `decode` the one batched decoder (greedy,
beam search, sampling) that training's val scores, evaluation, reports and
serving all use. Nothing here reads files other than a saved `.keras` model.
"""
