"""captioning.training.distributed: the same training on N replicas as on one device, resumable, chief-only outputs.

The tiny feature store of tests/test_training.py (three flat colours, a
random-init InceptionV3 at its smallest input) written to disk, because the
replicas run in processes of their own: the logical CPU devices of `mirrored`
and the cluster of `multi_worker` are fixed when TensorFlow starts
(tests/distributed_worker.py is that process). Clipping is set low enough to
act, so the tests also show it sees the global gradient.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioning.server_process import ServerProcess, free_port, port_open

WORKER = Path(__file__).parent / "distributed_worker.py"
SIZE = 75
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
PARAMS = {
    "embedding_dim": 16,
    "units": 24,
    "attention_units": 20,
    "encoder_dim": 12,
    "batch_size": 8,
    "captions_per_image": 0,  # every caption each pass: 6 steps of 8
    "budget_pairs": 96,  # two epochs of one pass
    "epoch_pairs": 48,
    "learning_rate": 0.01,
    "clip_norm": 0.5,  # acts on these gradients: clipping must see the global gradient
    "early_stopping_pairs": 0,  # never stop early
    "jit_compile": False,
    "deterministic": True,
    "val_sample_images": 4,
}
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """features/ (with extractor.json), tokens/ and references.json of 30 one-colour images."""
    from captioning.data.text import Vocabulary
    from captioning.features import build_extractor, extract_features

    root = tmp_path_factory.mktemp("distributed")
    rng = np.random.default_rng(0)
    rows = []
    for image_id in range(1, 31):
        colour = list(COLOURS)[image_id % 3]
        noise = rng.normal(0, 10, (SIZE, SIZE, 3))
        pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{image_id}.jpg")
        split = "val" if image_id > 24 else "train"
        rows.append({"image_id": image_id, "path": str(root / f"{image_id}.jpg"), "split": split})
        rows[-1]["caption"] = f"a {colour} picture"
    images = pd.DataFrame(rows)
    extractor = build_extractor("none", SIZE, 0)
    extract_features(images, root / "features", extractor, 8, 16, SIZE, False)
    vocab = Vocabulary.build(list(images.caption), 50)
    tokens = root / "tokens"
    tokens.mkdir()
    (tokens / "vocab.json").write_text(vocab.to_json())
    for split in ("train", "val"):
        part = images[images.split == split]
        ids = np.repeat(part.image_id.to_numpy(np.int64), 2)  # two captions per image
        np.save(tokens / f"{split}.npy", vocab.encode_batch(list(np.repeat(part.caption, 2)), 8))
        np.save(tokens / f"{split}_image_ids.npy", ids)
    references = {int(i): [c, c] for i, c in zip(images.image_id, images.caption, strict=True)}
    (root / "references.json").write_text(json.dumps(references))
    # Where the features stage leaves the extractor's ModelConfig fields.
    extractor_fields = {"image_size": SIZE, "extractor_weights": "none", "extractor_seed": 0}
    (root / "features" / "extractor.json").write_text(json.dumps(extractor_fields))
    return root


def _command(data: Path, out: Path, params: dict, devices: int = 1, kill_at: str = "") -> list:
    return [
        sys.executable, WORKER, "--data", data, "--out", out, "--weights", out.with_suffix(".npz"),
        "--params", json.dumps({**PARAMS, **params}), "--devices", str(devices),
        "--kill-at", kill_at,
    ]  # fmt: skip


def _run_one(data: Path, out: Path, params: dict, devices: int = 1) -> subprocess.Popen:
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_suffix(".log"), "wb")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen(
        [str(part) for part in _command(data, out, params, devices)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(process: subprocess.Popen, log: Path) -> None:
    try:
        code = process.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        raise
    assert code == 0, log.read_text()[-3000:]


def _weights(out: Path) -> list[np.ndarray]:
    with np.load(out.with_suffix(".npz")) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _assert_close(a: list[np.ndarray], b: list[np.ndarray], atol: float) -> None:
    assert len(a) == len(b)
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))
    assert worst <= atol, f"largest weight difference {worst}"


def test_chief_is_task_chief_or_worker_zero():
    from captioning.training.distributed import is_chief

    def config(kind, index, chief=False):
        cluster = {"worker": ["a:1", "b:2"], **({"chief": ["c:3"]} if chief else {})}
        return json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})

    assert is_chief("multi_worker", config("worker", 0))
    assert not is_chief("multi_worker", config("worker", 1))
    assert not is_chief("multi_worker", config("worker", 0, chief=True))
    assert is_chief("multi_worker", config("chief", 0, chief=True))
    assert is_chief("multi_worker", "")  # no cluster: a cluster of one
    assert is_chief("mirrored", config("worker", 1))  # one host: every process is its own


def test_replica_shares_sum_to_the_single_device_loss():
    import tensorflow as tf

    from captioning.model.loss import masked_loss

    rng = np.random.default_rng(0)
    targets = rng.integers(1, 9, (6, 7)).astype(np.int32)
    targets[:, 4:] = 0  # padding
    targets[0, 2:] = 0
    logits = rng.normal(size=(6, 7, 9)).astype(np.float32)
    weights = tf.nn.softmax(rng.normal(size=(6, 7, 5)).astype(np.float32), axis=-1)
    tokens = np.float32((targets != 0).sum())
    whole = masked_loss(targets, logits, weights, 0.7, 0.1)
    halves = [
        masked_loss(targets[s], logits[s], weights[s], 0.7, 0.1, tokens, np.float32(6))
        for s in (slice(0, 2), slice(2, 6))
    ]
    summed = [float(a + b) for a, b in zip(*halves, strict=True)]
    np.testing.assert_allclose(summed, [float(x) for x in whole], rtol=1e-6)
    one = masked_loss(targets, logits, weights, 0.7, 0.1, tokens, np.float32(6))
    np.testing.assert_allclose([float(x) for x in one], [float(x) for x in whole], rtol=1e-6)


@pytest.mark.parametrize("captions_per_image", [0, 2])
def test_each_caption_pair_is_read_once_per_epoch_across_pipelines(data, captions_per_image):
    from captioning.config import TrainParams
    from captioning.features import FeatureStore
    from captioning.training.batches import BatchPlan, CaptionSet, ShardedBatches

    train = CaptionSet.load(data / "tokens", "train")
    params = TrainParams(batch_size=8, captions_per_image=captions_per_image, seed=3)
    batches = ShardedBatches(FeatureStore(data / "features"), train, params, num_replicas=2)
    plan = BatchPlan(train, 8, captions_per_image or None)
    seen_images, widths = [], set()
    for units, rows in plan.epoch(3, 1):
        parts = [next(batches.slices(units, rows, range(p, p + 1))) for p in (0, 1)]
        every_row = np.concatenate(
            [tokens.reshape(-1, tokens.shape[-1]) for _, tokens, *_ in parts]
        )
        for features, tokens, global_tokens, global_rows in parts:
            assert len(features) == plan.per_batch // 2
            assert global_rows == rows.size
            assert global_tokens == (every_row[:, 1:] != 0).sum()
            widths.add(tokens.shape[-1])
        seen_images += list(plan.images[units] if plan.k else train.image_ids[rows])
    assert len(widths) == 1  # every slice cut to the global batch's width
    units = len(set(train.image_ids)) if captions_per_image else len(train)
    assert len(seen_images) == units // plan.per_batch * plan.per_batch
    with pytest.raises(ValueError, match="does not split evenly"):
        ShardedBatches(FeatureStore(data / "features"), train, params, num_replicas=3)


def _train_here(data: Path, out: Path, train=None, **params):
    """Train in this process (the default strategy: one device), without op determinism.

    `train`: the training function, by default the one `trainer` picks.
    """
    from captioning.config import TrainParams
    from captioning.data.text import Vocabulary
    from captioning.features import FeatureStore
    from captioning.training.batches import CaptionSet
    from captioning.training.distributed import trainer

    settings = TrainParams(**{**PARAMS, "deterministic": False, "budget_pairs": 48, **params})
    references = {int(k): v for k, v in json.loads((data / "references.json").read_text()).items()}
    model, _ = (train or trainer(settings))(
        FeatureStore(data / "features"),
        Vocabulary.from_json((data / "tokens" / "vocab.json").read_text()),
        CaptionSet.load(data / "tokens", "train"),
        CaptionSet.load(data / "tokens", "val"),
        settings,
        json.loads((data / "features" / "extractor.json").read_text()),
        out / "checkpoints",
        out / "history.csv",
        val_references=references,
    )
    model.load_weights(out / "checkpoints" / "last.weights.h5")
    return model


def test_the_loop_on_one_device_trains_as_fit(data, tmp_path):
    from captioning.config import TrainParams
    from captioning.training.distributed import train_distributed, trainer
    from captioning.training.fit import fit_captioner

    assert trainer(TrainParams()) is fit_captioner  # the defaults: today's path
    fitted = _train_here(data, tmp_path / "fit")
    looped = _train_here(data, tmp_path / "loop", train=train_distributed)
    _assert_close(fitted.get_weights(), looped.get_weights(), atol=1e-4)
    history = [pd.read_csv(tmp_path / name / "history.csv") for name in ("fit", "loop")]
    assert list(history[0].columns) == list(history[1].columns)
    np.testing.assert_allclose(history[0].loss, history[1].loss, rtol=1e-5)


def test_mixed_bfloat16_trains_and_writes_a_float32_model(data, tmp_path):
    fitted = _train_here(data, tmp_path / "fit")
    looped = _train_here(data, tmp_path / "bf16", precision="mixed_bfloat16")
    assert looped.dtype_policy.name == "float32"  # the written model serves in float32
    # bfloat16 keeps 8 bits of mantissa: the same training, to that precision.
    _assert_close(fitted.get_weights(), looped.get_weights(), atol=0.05)


def test_mixed_float16_scales_the_loss(data, tmp_path):
    model = _train_here(data, tmp_path / "fp16", precision="mixed_float16")
    history = pd.read_csv(tmp_path / "fp16" / "history.csv")
    assert np.isfinite(history.loss).all() and np.isfinite(history.val_loss).all()
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_trains_as_one_device(data, tmp_path):
    one = _run_one(data, tmp_path / "one", {"distribute": "none"})
    two = _run_one(data, tmp_path / "two", {"distribute": "mirrored"}, devices=2)
    _wait(one, tmp_path / "one.log")
    _wait(two, tmp_path / "two.log")
    assert "on 2 replicas" in (tmp_path / "two.log").read_text()
    _assert_close(_weights(tmp_path / "one"), _weights(tmp_path / "two"), atol=2e-4)
    history = [pd.read_csv(tmp_path / name / "history.csv") for name in ("one", "two")]
    np.testing.assert_allclose(history[0].val_loss, history[1].val_loss, rtol=1e-4)


class Cluster:
    """Two workers of one MultiWorkerMirroredStrategy on 127.0.0.1, each in its own folder."""

    def __init__(self, data: Path, root: Path, params: dict, kill_at: str = ""):
        ports = [free_port(), free_port()]
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        self.outs = [root / f"worker{i}" for i in range(2)]
        self.workers = []
        for index, port in enumerate(ports):
            task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            command = _command(data, self.outs[index], {**params, "distribute": "multi_worker"})
            if kill_at:
                command[-1] = kill_at
            self.workers.append(
                ServerProcess(
                    command,
                    port_open("127.0.0.1", port),
                    self.outs[index].with_suffix(".log"),
                    env={**os.environ, "TF_CONFIG": json.dumps(task)},
                    name=f"worker {index}",
                )
            )

    def run(self, expect_crash: bool = False) -> None:
        """Start both, wait for both (or for the chief's crash), and leave nothing running."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            for worker in self.workers:
                worker.start()
            chief = self.workers[0].process
            while time.monotonic() < deadline:
                codes = [w.process.poll() for w in self.workers]
                if expect_crash and codes[0] is not None:
                    assert codes[0] == -9, self.workers[0].tail()
                    return
                if not expect_crash and None not in codes:
                    assert codes == [0, 0], "\n".join(w.tail() for w in self.workers)
                    return
                time.sleep(0.5)
            raise TimeoutError(
                f"cluster still running after {RUN_TIMEOUT_S} s (chief {chief.poll()})"
            )
        finally:
            for worker in self.workers:
                worker.stop(grace_s=1)


def _summary(log: Path) -> dict:
    line = [row for row in log.read_text().splitlines() if row.startswith("summary ")][-1]
    return json.loads(line.removeprefix("summary "))


@pytest.mark.slow
def test_two_workers_train_as_one_process_and_resume_after_a_kill(data, tmp_path):
    single = _run_one(data, tmp_path / "single" / "one", {"distribute": "none"})
    whole = Cluster(data, tmp_path / "whole", {})
    whole.run()
    _wait(single, tmp_path / "single" / "one.log")

    chief, worker = (_weights(out) for out in whole.outs)
    summaries = [_summary(out.with_suffix(".log")) for out in whole.outs]
    assert summaries[0]["epochs_run"] == summaries[1]["epochs_run"] == 2
    _assert_close(chief, worker, atol=0.0)
    _assert_close(chief, _weights(tmp_path / "single" / "one"), atol=2e-4)
    assert {p.name for p in whole.outs[0].iterdir()} == {
        "checkpoints",
        "history.csv",
        "records.jsonl",
    }
    assert list(whole.outs[1].iterdir()) == []  # the worker wrote nothing of training's

    # SIGKILL mid-epoch 2 (the chief dies, the worker is killed), then both start again.
    crashed = Cluster(data, tmp_path / "crashed", {}, kill_at="2:3")
    crashed.run(expect_crash=True)
    state = json.loads((crashed.outs[0] / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1
    # Meanwhile a copy of that two-worker checkpoint resumes in one process: N workers -> M.
    resumed = tmp_path / "resumed" / "one"
    shutil.copytree(crashed.outs[0] / "checkpoints", resumed / "checkpoints")
    one = _run_one(data, resumed, {"distribute": "mirrored"})
    Cluster(data, tmp_path / "crashed", {}).run()
    _wait(one, resumed.with_suffix(".log"))
    assert _summary(crashed.outs[0].with_suffix(".log"))["resumed_from_epoch"] == 1
    _assert_close(_weights(crashed.outs[0]), chief, atol=0.0)
    assert _summary(resumed.with_suffix(".log"))["resumed_from_epoch"] == 1
    _assert_close(_weights(resumed), chief, atol=2e-4)


def _stage_workspace(root: Path, params: dict) -> Path:
    """A folder to run the train stage in (`python -m stages.train`): stages/ and params.yaml."""
    import yaml

    from captioning.config import read_params

    repo = Path(__file__).parents[1]
    all_params = read_params(repo / "params.yaml")
    all_params["train"].update(params)
    shutil.copytree(repo / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(all_params))
    return root


@pytest.mark.slow
def test_train_stage_on_two_workers_writes_outputs_and_mlflow_records_on_the_chief_only(
    data, tmp_path
):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"source": "local", "root": str(raw)}))
    references = json.loads((data / "references.json").read_text())
    table = pd.DataFrame(
        [
            {
                "image_id": int(i),
                "path": "",
                "caption": c,
                "split": "val" if int(i) > 24 else "train",
            }
            for i, captions in references.items()
            for c in captions
        ]
    )
    table.to_parquet(tmp_path / "captions.parquet")
    params = {**PARAMS, "distribute": "multi_worker", "budget_pairs": 48}
    folders = [_stage_workspace(tmp_path / f"worker{i}", params) for i in range(2)]
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    command = [
        sys.executable, "-m", "stages.train", "--features", data / "features", "--tokens", data / "tokens",
        "--table", tmp_path / "captions.parquet", "--raw", raw,
        "--model", "models/captioner.keras", "--checkpoints", "models/checkpoints",
        "--history", "reports/train_history.csv", "--live", "dvclive",
        "--run", "models/mlflow_run.json",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    workers = [
        ServerProcess(
            command,
            port_open("127.0.0.1", port),
            tmp_path / f"worker{index}.log",
            env={
                **env,
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
            },
            cwd=folders[index],
            ready_timeout_s=RUN_TIMEOUT_S,
            name=f"worker {index}",
        )
        for index, port in enumerate(ports)
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            assert worker.process.wait(RUN_TIMEOUT_S) == 0, worker.tail()
    finally:
        for worker in workers:
            worker.stop(grace_s=1)
    chief = folders[0]
    outputs = ("models/captioner.keras", "models/mlflow_run.json", "reports/train_history.csv")
    for output in (*outputs, "dvclive/metrics.json", "dvclive/plots/metrics/eval/loss.tsv"):
        assert (chief / output).exists(), output
    import mlflow

    run_id = json.loads((chief / "models/mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{chief / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [48]  # pairs seen
    assert "train (worker):" in (tmp_path / "worker1.log").read_text()
    assert sorted(p.name for p in folders[1].iterdir()) == ["params.yaml", "stages"]


@pytest.mark.slow
def test_one_process_killed_mid_epoch_resumes_to_the_uninterrupted_weights(data, tmp_path):
    """The default engine (`distribute: none`, Keras `fit`) under op determinism."""
    whole = _run_one(data, tmp_path / "whole" / "one", {"distribute": "none"})
    _wait(whole, tmp_path / "whole" / "one.log")
    crashed = tmp_path / "crashed" / "one"
    crashed.parent.mkdir(parents=True)
    killed = subprocess.run(
        [str(part) for part in _command(data, crashed, {"distribute": "none"}, kill_at="2:3")],
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert json.loads((crashed / "checkpoints" / "state.json").read_text())["epoch"] == 1
    again = _run_one(data, crashed, {"distribute": "none"})
    _wait(again, crashed.with_suffix(".log"))
    assert _summary(crashed.with_suffix(".log"))["resumed_from_epoch"] == 1
    _assert_close(_weights(crashed), _weights(tmp_path / "whole" / "one"), atol=0.0)


@pytest.mark.slow
def test_the_pipeline_runs_through_dvc_repro_on_two_local_workers(tmp_path):
    """docs/scaling.md's two commands: the chief's `dvc repro` and worker 1's train command."""
    import yaml

    from pipeline_fixtures import VENV_BIN, describe, make_project

    project = make_project(tmp_path, {"train.distribute": "multi_worker"})
    project.dvc("repro", "features", "tokenize")  # what train reads, before the workers start
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}

    def tf_config(index: int) -> dict[str, str]:
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        return {**project.env, "TF_CONFIG": json.dumps(task)}

    # The train stage's own command from dvc.yaml, run by hand on worker 1 in the same checkout.
    stages = yaml.safe_load((project.root / "dvc.yaml").read_text())["stages"]
    python, *arguments = stages["train"]["cmd"].split()
    assert python == "python"
    worker = ServerProcess(
        [str(VENV_BIN / "python"), *arguments],
        port_open("127.0.0.1", ports[1]),
        tmp_path / "worker1.log",
        env=tf_config(1),
        cwd=project.root,
        ready_timeout_s=RUN_TIMEOUT_S,
        name="worker 1",
    )
    try:
        worker.start()
        chief = subprocess.run(
            [str(VENV_BIN / "dvc"), "repro"],
            cwd=project.root,
            env=tf_config(0),
            capture_output=True,
            text=True,
            timeout=2 * RUN_TIMEOUT_S,
        )
        assert chief.returncode == 0, describe(chief) + "\n--- worker 1 ---\n" + worker.tail()
        assert worker.process.wait(RUN_TIMEOUT_S) == 0, worker.tail()
    finally:
        worker.stop(grace_s=1)
    assert "Running stage 'train'" in chief.stdout, describe(chief)
    assert json.loads((project.root / "reports" / "metrics.json").read_text())["CIDEr"] >= 0
    status = project.dvc("status")
    assert "up to date" in status.stdout, describe(status)
