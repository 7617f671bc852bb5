"""Tests for captioning.serving.savedmodel: the TF Serving export captions like the Keras model.

A tiny untrained captioner over a 75 px InceptionV3 is exported once per
module; a fresh Python process (no captioning package imported, as in TF
Serving) loads it with `tf.saved_model.load` and captions pixels and PNG bytes;
its tokens, captions and scores must equal `ImageCaptioner`'s greedy ones.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.serving.inference import ImageCaptioner
from captioning.serving.savedmodel import export_savedmodel
from captioning.training.checkpoints import save_model

MAX_LEN = 7
SIZES = {"embedding_dim": 8, "units": 8, "attention_units": 8, "encoder_dim": 8}

# Runs in its own interpreter: only TensorFlow, the way a non-Python-package runtime sees it.
LOADER = """
import json, sys
import numpy as np
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
pixels = np.load(sys.argv[2])
pngs = json.loads(open(sys.argv[3]).read())
by_pixels = model.caption_pixels(tf.constant(pixels))
serving = model.signatures["serving_default"]
by_bytes = serving(images=tf.constant([bytes.fromhex(h) for h in pngs]))
out = {}
for name, result in (("pixels", by_pixels), ("bytes", by_bytes)):
    out[name] = {
        "tokens": result["tokens"].numpy().tolist(),
        "captions": [c.decode() for c in result["captions"].numpy()],
        "scores": result["scores"].numpy().tolist(),
    }
out["signatures"] = sorted(model.signatures)
print(json.dumps(out))
"""


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (40, 52, 3), dtype=np.uint8) for _ in range(n)]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_captioner):
    root = tmp_path_factory.mktemp("savedmodel")
    keras_path = root / "tiny.keras"
    save_model(tiny_captioner(None, (1, 2048), image_size=75, **SIZES), keras_path)
    return keras_path, export_savedmodel(keras_path, root / "savedmodel", max_len=MAX_LEN)


@pytest.mark.slow
def test_savedmodel_reloaded_in_a_fresh_process_captions_like_keras(exported, tmp_path):
    keras_path, savedmodel = exported
    assert (savedmodel / "saved_model.pb").is_file()
    images = _images(4)
    np.save(tmp_path / "pixels.npy", np.stack(images))
    (tmp_path / "pngs.json").write_text(json.dumps([_png(p).hex() for p in images]))
    run = subprocess.run(
        [sys.executable, "-c", LOADER, str(savedmodel), str(tmp_path / "pixels.npy")]
        + [str(tmp_path / "pngs.json")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads(run.stdout.strip().splitlines()[-1])
    assert served["signatures"] == ["caption_images", "caption_pixels", "serving_default"]

    expected = ImageCaptioner(keras_path).caption_bytes(
        [_png(p) for p in images], method="greedy", max_len=MAX_LEN
    )
    for name in ("pixels", "bytes"):
        assert served[name]["tokens"] == expected.tokens.tolist(), name
        assert served[name]["captions"] == expected.captions, name
        np.testing.assert_allclose(served[name]["scores"], expected.scores, rtol=1e-4, atol=1e-5)
    # Different images give different scores: the graph reads its input.
    assert len(set(np.round(expected.scores, 5))) > 1


def test_export_writes_the_folder_whole(exported):
    _, savedmodel = exported
    siblings = sorted(p.name for p in Path(savedmodel).parent.iterdir())
    assert siblings == ["savedmodel", "tiny.keras"]
    assert (Path(savedmodel) / "variables").is_dir()
