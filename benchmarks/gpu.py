"""The accelerator benchmark: `make bench-gpu` (`python -m benchmarks.gpu`).

On a machine with a GPU it measures what scaling out needs to know:
extraction images/s (bare InceptionV3 and `extract_features` end to end),
training caption pairs/s of the compiled step in float32 and in mixed
precision (train.precision's mixed_float16 and mixed_bfloat16), batched greedy
decoding captions/s, and each one's share of the device's peak, measured in
the same run by large matmuls (float32, and float16/bfloat16 for mixed
precision). Without a GPU it says so and runs the same measurements on the CPU
at `--quick`'s sizes, so the script is checked wherever it runs. The figures
go to `reports/bench_gpu.json` with the device's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import tensorflow as tf

from benchmarks.decode import bench_decode
from benchmarks.features import bench_features
from benchmarks.flops import TRAINING_PER_FORWARD, captioner_flops, peak_gflops
from benchmarks.results import Result, machine_info
from benchmarks.train import precision_rate
from benchmarks.workspace import (
    CAPTION_TOKENS,
    FULL,
    QUICK,
    REPO_ROOT,
    TRAIN_BATCH,
    VOCAB_SIZE,
    Sizes,
    Workspace,
    tutorial_model,
)

GPU_REPORT = REPO_ROOT / "reports" / "bench_gpu.json"
# A GPU runs these in seconds: more images and batches than the CPU run, fewer
# repeats of the slow one-at-a-time baselines, bigger matmuls for the peak.
GPU_SIZES = dataclasses.replace(
    FULL, feature_images=1024, train_batches=40, train_unrolled=False,
    decode_single=16, decode_repeats=3, decode_eager=2, peak_matmul=8192,
)  # fmt: skip
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # train.precision's values
_HALF = {"mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}


def device() -> dict:
    """The first GPU TensorFlow sees (name, compute capability, TF32 on or off), or none."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"gpu": None, "gpus": 0}
    details = tf.config.experimental.get_device_details(gpus[0])
    return {
        "gpu": details.get("device_name", gpus[0].name),
        "gpus": len(gpus),
        "compute_capability": list(details.get("compute_capability", ())),
        # On Ampere and later TensorFlow runs float32 matmuls as TF32 by default,
        # in the model and in the peak alike.
        "tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
    }


def bench_precisions(ws: Workspace) -> Result:
    """Training pairs/s under each train.precision, with its share of float32 and half peaks."""
    sizes = ws.sizes
    result = Result(
        f"train: caption pairs/s by train.precision (the step the train stage runs for it), "
        f"batch {TRAIN_BATCH}, {sizes.train_batches} timed batches"
    )
    words = CAPTION_TOKENS - 1
    per_pair = TRAINING_PER_FORWARD * captioner_flops(tutorial_model(ws.vocab_size)).forward(words)
    peak32 = peak_gflops(sizes.peak_matmul)
    result.add(f"peak float32 ({sizes.peak_matmul}^2 matmul)", peak32, "GFLOP/s")
    result.add("model FLOPs per caption pair (training)", per_pair / 1e9, "GFLOP")
    for precision in PRECISIONS:
        row = {"precision": precision}
        try:
            rate = precision_rate(ws.vocab_size, sizes.train_batches, precision)
        except Exception as err:  # a precision this device or the model cannot run: say which
            result.notes.append(f"{precision} failed: {type(err).__name__}: {str(err)[:300]}")
            continue
        achieved = per_pair * rate / 1e9
        row.update(
            {"pairs/s": rate, "GFLOP/s": achieved, "% of float32 peak": 100 * achieved / peak32}
        )
        if precision in _HALF:
            half = peak_gflops(sizes.peak_matmul, _HALF[precision])
            row.update({"half peak GFLOP/s": half, "% of half peak": 100 * achieved / half})
        result.add_row(row)
    return result


def _run(sizes: Sizes) -> dict:
    report = {"device": device(), "machine": machine_info(), "sizes": dataclasses.asdict(sizes)}
    report["benchmarks"] = {}
    with tempfile.TemporaryDirectory(prefix="captioning-bench-gpu-") as tmp:
        ws = Workspace(Path(tmp), sizes, VOCAB_SIZE, sizes.feature_images)
        for name, bench in (
            ("features", bench_features),
            ("train_precision", bench_precisions),
            ("decode", bench_decode),
        ):
            result = bench(ws)
            result.print()
            report["benchmarks"][name] = result.to_json()
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GPU_REPORT, help="where to write the JSON")
    args = parser.parse_args(argv)
    found = device()
    if found["gpu"]:
        print(f"device: {found['gpu']} x {found['gpus']} (TF32 matmuls: {found['tf32']})")
        sizes = GPU_SIZES
    else:
        print(
            "no GPU: TensorFlow sees only the CPU. Running the same measurements on the CPU at "
            "--quick sizes, to check the script; these are not GPU figures."
        )
        sizes = QUICK
    report = _run(sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
