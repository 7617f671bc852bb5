"""Serving: the MLflow pyfunc model, the model registry and image-to-caption inference.

`inference` turns image files or bytes into captions with the InceptionV3
extractor and a saved captioner; `pyfunc` wraps that as the MLflow model that
`mlflow models serve` answers with (`served_model` is the file MLflow runs to
build it); `registry` registers a run's model and moves the champion alias.
"""
