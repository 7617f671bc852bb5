"""Building blocks of the pipeline integration tests: throwaway DVC projects and COCO folders.

`make_project` copies the pipeline definition (dvc.yaml, params.yaml, stages/,
src/, .gitignore; nothing generated) into a fresh git + DVC repository, shrinks
params.yaml to a setting that runs end to end in a minute or two on a laptop
CPU, and returns a `Project` that runs commands in it with the environment the
Makefile gives DVC: the project's virtualenv first on PATH (dvc.yaml says
`python`) and MLflow pointed at a sqlite file beside the project. The stages
import the `captioning` package installed from this checkout; the copy of src/
is there because dvc.yaml lists its files as dependencies.

`write_coco_folder` writes a tiny data set in the real COCO 2014 layout (file
naming and annotation schema) for the `data.source: local` path, and
`add_problem_cases` adds the awkward files and annotations validate must handle.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's virtualenv (`make install`); else the one running the tests. Its bin/ holds
# python, dvc and the `captioning` entry point.
VENV_BIN = (
    REPO_ROOT / ".venv" / "bin"
    if (REPO_ROOT / ".venv" / "bin").is_dir()
    else Path(sys.executable).parent
)
GIT_USER = ("-c", "user.name=pipeline-test", "-c", "user.email=pipeline-test@localhost")
COMMAND_TIMEOUT_S = 1800
OUTPUT_TAIL = 6000

# Small enough that the whole pipeline runs in a minute or two on two cores.
TINY_PARAMS: dict[str, Any] = {
    "data.demo_train_images": 24,
    "data.demo_val_images": 12,
    "features.batch_size": 8,
    "features.shard_size": 16,
    "train.budget_pairs": 32,  # two epochs of one 16-caption step
    "train.epoch_pairs": 16,
    "train.batch_size": 16,
    "train.units": 32,
    "train.attention_units": 32,
    "train.embedding_dim": 16,
    "train.encoder_dim": 16,
    "report.num_images": 2,
    "evaluate.batch_size": 8,
    # A run this small scores far below the project's gates, and a run below them never
    # becomes champion; the tests that serve the champion need one.
    "gates.floors.BLEU-4": 0.0,
    "gates.floors.CIDEr": 0.0,
}

# Environment variables that would leak the caller's MLflow/DVC/Python context into the project.
_LEAKY_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
    "DVC_ROOT",
    "PYTHONPATH",
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'units': 32}} -> {'train.units': 32} (written here, not imported, to check ours)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_params(params_file: Path, overrides: dict[str, Any]) -> None:
    """Set `section.key` values in params.yaml; every key must exist already."""
    params = yaml.safe_load(params_file.read_text())
    known = flatten(params)
    for dotted, value in overrides.items():
        assert dotted in known, f"{dotted} is not a key of {params_file}"
        *parents, key = dotted.split(".")
        node = params
        for parent in parents:
            node = node[parent]
        node[key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(flatten(yaml.safe_load(params_file.read_text()))) == set(known)


def pipeline_env(mlflow_db: Path) -> dict[str, str]:
    """What the Makefile exports for DVC, with MLflow on a sqlite file of the test's own."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
        MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db.resolve()}",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        # The tiny runs train for seconds: sample system metrics often enough to see some.
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="2",
    )
    return env


def _tail(text: str) -> str:
    return text if len(text) <= OUTPUT_TAIL else "...\n" + text[-OUTPUT_TAIL:]


def describe(done: subprocess.CompletedProcess) -> str:
    """A failure message with the command, its exit code and the end of its output."""
    command = " ".join(map(str, done.args))
    return (
        f"`{command}` exited {done.returncode}\n"
        f"--- stdout ---\n{_tail(done.stdout)}\n--- stderr ---\n{_tail(done.stderr)}"
    )


@dataclasses.dataclass
class Project:
    """A throwaway git + DVC copy of the pipeline and the environment to run it in."""

    root: Path
    env: dict[str, str]
    tracking_uri: str

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command in the project; with `check`, a failure shows its output."""
        done = subprocess.run(
            [str(a) for a in args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        if check:
            assert done.returncode == 0, describe(done)
        return done

    def dvc(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(VENV_BIN / "dvc", *args, check=check)

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("git", *GIT_USER, *args, check=check)

    def commit_all(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").stdout.strip()

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())


def _copy_sources(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    for name in ("stages", "src"):
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)


def make_project(base: Path, overrides: dict[str, Any] | None = None) -> Project:
    """`base/project`: the pipeline with tiny params (+ `overrides`), committed, DVC initialised.

    MLflow writes to `base/mlflow.db`, outside the repository.
    """
    root = base / "project"
    root.mkdir(parents=True)
    _copy_sources(root)
    set_params(root / "params.yaml", {**TINY_PARAMS, **(overrides or {})})
    mlflow_db = base / "mlflow.db"
    env = pipeline_env(mlflow_db)
    project = Project(root, env, env["MLFLOW_TRACKING_URI"])

    project.run("git", "init", "-q")
    # `dvc exp run` commits on its own, without our -c flags: give the repo an identity.
    project.run("git", "config", "user.name", "pipeline-test")
    project.run("git", "config", "user.email", "pipeline-test@localhost")
    project.commit_all("pipeline sources")
    project.dvc("init", "-q")
    project.dvc("config", "core.analytics", "false")
    project.commit_all("dvc init")
    return project


def declared_outputs(dvc_yaml: Path) -> list[str]:
    """Every path a stage of dvc.yaml declares as outs, metrics or plots, plus top-level plot files."""

    def paths(entries) -> list[str]:
        # An entry is a path, or a one-key mapping path -> options.
        return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]

    spec = yaml.safe_load(dvc_yaml.read_text())
    found: list[str] = []
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            found += paths(stage.get(kind))
    for plot in spec.get("plots") or []:
        if isinstance(plot, str):
            found.append(plot)
            continue
        name, options = next(iter(plot.items()))
        y = (options or {}).get("y")
        found += list(y) if isinstance(y, dict) else [name]
    return sorted(set(found))


# --- a tiny data set in the COCO 2014 layout ----------------------------------------------------

_COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 210, 40),
}
_SHAPES = ("square", "circle")
_TEMPLATES = (
    "A {colour} {shape} on a grey background.",
    "a {shape} that is {colour}",
    "There is a {colour} {shape} in the picture",
    "A picture of one {colour} {shape}.",
    "a plain {colour} {shape}",
)


def _scene(rng: random.Random, width: int, height: int, colour: str, shape: str) -> Image.Image:
    grey = rng.randint(90, 160)
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=_COLOURS[colour])
    return image


def write_coco_folder(root: Path, n_train: int = 8, n_val: int = 6, seed: int = 0) -> dict:
    """Write `root/{train2014,val2014}/COCO_<split>_<12-digit id>.jpg` and
    `root/annotations/captions_{train,val}2014.json` in the COCO schema.

    Returns {"train2014": [ids], "val2014": [ids]}.
    """
    rng = random.Random(seed)
    ids = rng.sample(range(1, 600_000), n_train + n_val)
    written = {"train2014": sorted(ids[:n_train]), "val2014": sorted(ids[n_train:])}
    (root / "annotations").mkdir(parents=True)
    annotation_id = 1
    for split, split_ids in written.items():
        (root / split).mkdir()
        images, annotations = [], []
        for image_id in split_ids:
            width, height = rng.randint(48, 96), rng.randint(40, 80)
            colour, shape = rng.choice(sorted(_COLOURS)), rng.choice(_SHAPES)
            name = f"COCO_{split}_{image_id:012d}.jpg"
            _scene(rng, width, height, colour, shape).save(root / split / name, "JPEG", quality=90)
            images.append(
                {
                    "license": 1,
                    "file_name": name,
                    "coco_url": f"http://images.cocodataset.org/{split}/{name}",
                    "height": height,
                    "width": width,
                    "date_captured": "2013-11-14 16:28:13",
                    "flickr_url": f"http://farm3.staticflickr.com/1/{image_id}_0.jpg",
                    "id": image_id,
                }
            )
            for template in _TEMPLATES:
                caption = template.format(colour=colour, shape=shape)
                annotations.append({"image_id": image_id, "id": annotation_id, "caption": caption})
                annotation_id += 1
        document = {
            "info": {
                "description": "pipeline test data in the COCO 2014 captions schema",
                "url": "http://mscoco.org",
                "version": "1.0",
                "year": 2014,
                "contributor": "pipeline tests",
                "date_created": "2015-01-27 09:11:52.357475",
            },
            "images": images,
            "licenses": [
                {
                    "url": "http://creativecommons.org/licenses/by/2.0/",
                    "id": 1,
                    "name": "Attribution License",
                }
            ],
            "annotations": annotations,
        }
        path = root / "annotations" / f"captions_{split}.json"
        path.write_text(json.dumps(document))
    return written


# --- the awkward cases the validate stage handles -----------------------------------------------

# name -> (folder, image id); ids far above write_coco_folder's (< 600 000), so they never clash.
PROBLEM_CASES: dict[str, tuple[str, int]] = {
    "grayscale": ("train2014", 900_001),  # mode L JPEG, and one whitespace-only caption
    "cmyk": ("val2014", 900_002),  # CMYK JPEG
    "png_as_jpg": ("val2014", 900_003),  # PNG bytes under a .jpg name
    "truncated": ("train2014", 900_004),  # a JPEG cut in half
    "zero_byte": ("val2014", 900_005),  # an empty file
    "missing": ("val2014", 900_006),  # annotated, but no file at all
}
KEPT_CASES = ("grayscale", "cmyk", "png_as_jpg")
QUARANTINE_REASONS = {"truncated": "truncated", "zero_byte": "empty_file"}
BLANK_CAPTION = " \t "


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """`image` saved in `fmt` (JPEG, PNG, ...) as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def coco_file_name(folder: str, image_id: int) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg"


def _problem_bytes(case: str, image: Image.Image) -> bytes | None:
    """The file content of one of `PROBLEM_CASES` made from an RGB `image`; None: no file."""
    if case == "grayscale":
        return encode(image.convert("L"), "JPEG", quality=90)
    if case == "cmyk":
        return encode(image.convert("CMYK"), "JPEG", quality=90)
    if case == "png_as_jpg":
        return encode(image, "PNG")
    if case == "truncated":
        jpeg = encode(image, "JPEG", quality=90)
        return jpeg[: len(jpeg) // 2]
    if case == "zero_byte":
        return b""
    assert case == "missing", case
    return None


def add_problem_cases(root: Path, seed: int = 1) -> dict[str, int]:
    """Add `PROBLEM_CASES` to a folder from `write_coco_folder`: files and annotations.

    Each case but `missing` gets a file; each gets an entry in its folder's
    annotation file with five ordinary captions, and `grayscale` also a
    `BLANK_CAPTION`. Returns {case: image_id}.
    """
    rng = random.Random(seed)

    def scene() -> tuple[Image.Image, list[str]]:
        colour, shape = rng.choice(sorted(_COLOURS)), rng.choice(_SHAPES)
        captions = [t.format(colour=colour, shape=shape) for t in _TEMPLATES]
        return _scene(rng, 64, 48, colour, shape), captions

    contents: dict[str, bytes | None] = {}
    captions: dict[str, list[str]] = {}
    for case in PROBLEM_CASES:
        image, captions[case] = scene()
        contents[case] = _problem_bytes(case, image)
    captions["grayscale"].insert(2, BLANK_CAPTION)

    documents = {
        folder: json.loads((root / "annotations" / f"captions_{folder}.json").read_text())
        for folder in ("train2014", "val2014")
    }
    # Annotation ids are unique across both files, as in COCO.
    annotation_ids = itertools.count(
        1 + max(a["id"] for d in documents.values() for a in d["annotations"])
    )
    for case, (folder, image_id) in PROBLEM_CASES.items():
        name = coco_file_name(folder, image_id)
        if contents[case] is not None:
            (root / folder / name).write_bytes(contents[case])
        documents[folder]["images"].append(
            {"license": 1, "file_name": name, "height": 48, "width": 64, "id": image_id}
        )
        documents[folder]["annotations"] += [
            {"image_id": image_id, "id": next(annotation_ids), "caption": caption}
            for caption in captions[case]
        ]
    for folder, document in documents.items():
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps(document))
    return {case: image_id for case, (_, image_id) in PROBLEM_CASES.items()}
