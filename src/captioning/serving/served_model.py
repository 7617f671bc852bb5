"""The file MLflow runs to build the served captioner ("models from code").

`captioning.serving.pyfunc.log_captioner_model` logs this file's path as the pyfunc
`python_model`: MLflow copies it into the model and executes it on every load,
with the model's `code/` folder (this package) importable, so loading a model
runs reviewed source instead of unpickling an object. Executing it registers a
fresh `CaptionerModel` with `mlflow.models.set_model`; MLflow then calls its
`load_context` with the logged artifacts and `model_config`. Nothing imports
this module.
"""

import mlflow

from captioning.serving.pyfunc import CaptionerModel

mlflow.models.set_model(CaptionerModel())
