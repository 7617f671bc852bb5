"""`captioning gate`: floors, tolerances against a base, the Markdown table and the exit code.

The unit tests write metrics files shaped like the evaluate stage's
reports/metrics.json into tmp_path and run the real command. The end-to-end
test builds a tiny git + DVC project whose one stage writes metrics from
params, reproduces a base commit and a PR commit, and gates the PR against the
base with `dvc metrics diff`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from captioning.cli import main
from captioning.config import GatesParams, load_section
from captioning.evaluation import gate
from captioning.evaluation.nltk_bleu import NLTK_KEYS
from pipeline_fixtures import GIT_USER, VENV_BIN, describe, pipeline_env

REPO_ROOT = Path(__file__).resolve().parents[1]

# What stages/evaluate.py writes on the demo data (values from a small run).
EVALUATE_METRICS = {
    "BLEU-1": 0.712,
    "BLEU-2": 0.551,
    "BLEU-3": 0.433,
    "BLEU-4": 0.341,
    "METEOR": 0.287,
    "ROUGE-L": 0.598,
    "CIDEr": 1.104,
    "BLEU-1_nltk": 0.714,
    "BLEU-2_nltk": 0.552,
    "BLEU-3_nltk": 0.434,
    "BLEU-4_nltk": 0.342,
    "object_accuracy": 0.62,
    "human_BLEU-4": 0.402,
    "human_CIDEr": 1.55,
    "num_images": 150,
    "mean_words": 9.3,
    "decoder": "greedy",
    "skipped": {"SPICE": "SPICE needs its Stanford CoreNLP jars"},
}

GATES = {
    "floors": {"BLEU-4": 0.2, "CIDEr": 0.5, "object_accuracy": 0.5},
    "tolerances": {"BLEU-4": 0.02, "METEOR": 0.02, "CIDEr": 0.05, "object_accuracy": 0.03},
}


@pytest.fixture
def files(tmp_path):
    """Write params (gates only) and metrics files in tmp_path; returns a writer."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"gates": GATES}))

    def write(name: str, changes: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
        metrics = {**EVALUATE_METRICS, **(changes or {})}
        for key in drop:
            metrics.pop(key)
        path = tmp_path / name
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        return path

    write.params = params  # type: ignore[attr-defined]
    return write


def _gate(capsys, files, pr: Path, base: Path | None = None, *extra: str) -> tuple[int, str, str]:
    args = ["gate", "--metrics", str(pr), "--params", str(files.params)]
    if base is not None:
        args += ["--base-metrics", str(base)]
    code = main([*args, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _row(table: str, metric: str) -> list[str]:
    """The cells of `metric`'s table row."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == metric:
            return cells
    raise AssertionError(f"no row for {metric} in\n{table}")


def test_equal_metrics_pass(capsys, files):
    code, table, _ = _gate(capsys, files, files("pr.json"), files("base.json"))
    assert code == 0
    assert "Quality gate: passed" in table
    assert "| metric | base | PR | change | verdict |" in table
    for metric in ("BLEU-4", "METEOR", "CIDEr", "object_accuracy"):
        cells = _row(table, metric)
        assert cells[3] == "0" and cells[4] == "pass", cells
    assert "fail" not in table


def test_a_drop_beyond_tolerance_fails_and_the_table_names_the_metric(capsys, files):
    pr = files("pr.json", {"CIDEr": 1.104 - 0.08})
    code, table, err = _gate(capsys, files, pr, files("base.json"))
    assert code == 1
    assert "Quality gate: failed (1 of 4: CIDEr)" in table
    cells = _row(table, "CIDEr")
    assert cells[1:4] == ["1.1040", "1.0240", "-0.0800 (-7.2%)"]
    assert cells[4] == "**fail**: dropped 0.0800 > tolerance 0.0500"
    assert _row(table, "BLEU-4")[4] == "pass"
    assert "CIDEr fail" in err


def test_a_drop_within_tolerance_passes(capsys, files):
    # Exactly the tolerance is allowed (float noise from the subtraction included).
    pr = files("pr.json", {"BLEU-4": 0.341 - 0.02, "CIDEr": 1.104 - 0.049})
    code, table, _ = _gate(capsys, files, pr, files("base.json"))
    assert code == 0, table
    assert _row(table, "BLEU-4")[4] == "pass"


def test_a_metric_below_its_floor_fails_even_without_a_base(capsys, files):
    code, table, err = _gate(capsys, files, files("pr.json", {"BLEU-4": 0.15}))
    assert code == 1
    assert _row(table, "BLEU-4")[4] == "**fail**: below floor 0.2000"
    assert "No base metrics: compared with the floors only." in table
    assert "BLEU-4 fail (below floor 0.2000)" in err


def test_below_floor_and_dropped_gives_both_reasons(capsys, files):
    pr = files("pr.json", {"object_accuracy": 0.4})
    code, table, _ = _gate(capsys, files, pr, files("base.json"))
    assert code == 1
    assert _row(table, "object_accuracy")[4] == (
        "**fail**: below floor 0.5000; dropped 0.2200 > tolerance 0.0300"
    )


def test_a_missing_metric_fails_with_a_clear_message(capsys, files):
    pr = files("pr.json", drop=("object_accuracy",))
    code, table, err = _gate(capsys, files, pr, files("base.json"))
    assert code == 1
    cells = _row(table, "object_accuracy")
    assert cells[1:4] == ["0.6200", "—", "—"]
    assert cells[4] == f"**missing**: object_accuracy is not in {pr}"
    assert "Quality gate: failed (1 of 4: object_accuracy)" in table
    assert f"object_accuracy missing (object_accuracy is not in {pr})" in err


def test_a_skipped_or_non_numeric_metric_is_missing_with_the_reason(capsys, files):
    files.params.write_text(yaml.safe_dump({"gates": {"floors": {"SPICE": 0.1, "decoder": 0.0}}}))
    code, table, _ = _gate(capsys, files, files("pr.json"))
    assert code == 1
    assert _row(table, "SPICE")[4] == (
        "**missing**: skipped by evaluate: SPICE needs its Stanford CoreNLP jars"
    )
    assert _row(table, "decoder")[4] == "**missing**: not a number: 'greedy'"


def test_an_improvement_passes_and_is_marked(capsys, files):
    pr = files("pr.json", {"CIDEr": 1.204, "METEOR": 0.297})
    code, table, err = _gate(capsys, files, pr, files("base.json"))
    assert code == 0
    assert _row(table, "CIDEr")[3:] == ["+0.1000 (+9.1%)", "improved"]
    # A rise within the tolerance is noise, not an improvement.
    assert _row(table, "METEOR")[4] == "pass"
    assert "Quality gate: passed (4 metrics, 1 improved)" in table
    assert "gate passed" in err


def test_a_base_without_the_metric_is_compared_with_the_floor_only(capsys, files):
    code, table, _ = _gate(capsys, files, files("pr.json"), files("base.json", drop=("METEOR",)))
    assert code == 0
    assert _row(table, "METEOR")[1:] == ["—", "0.2870", "—", "pass: no base value"]


def test_ungated_metrics_new_to_this_run_are_neither_gated_nor_missing(capsys, files):
    # A base recorded before evaluate wrote NLTK's BLEU: the new keys have no
    # floor or tolerance, so they change nothing.
    base = files("base.json", drop=NLTK_KEYS)
    code, table, err = _gate(capsys, files, files("pr.json"), base)
    assert code == 0, table
    assert "Quality gate: passed (4 metrics, 0 improved)" in table
    assert "_nltk" not in table
    assert "gate passed" in err


def test_a_base_of_another_size_is_flagged(capsys, files):
    code, table, _ = _gate(capsys, files, files("pr.json"), files("base.json", {"num_images": 80}))
    assert code == 0
    assert "num_images=80, this run num_images=150: the comparison is not like for like" in table


def test_out_writes_the_same_table(capsys, files, tmp_path):
    out = tmp_path / "ci" / "gate.md"
    code, table, _ = _gate(capsys, files, files("pr.json"), None, "--out", str(out))
    assert code == 0
    assert out.read_text() == table


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "absent.json", "absent.json not found: run the pipeline first"),
        (lambda d: _write(d / "bad.json", "{not json"), "bad.json is not valid JSON"),
        (
            lambda d: _write(d / "list.json", "[1, 2]"),
            "expected a JSON object of metrics, got list",
        ),
    ],
)
def test_unreadable_metrics_exit_2(capsys, files, tmp_path, setup, message):
    code, _, err = _gate(capsys, files, setup(tmp_path))
    assert code == 2
    assert message in err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_ref_and_base_metrics_are_exclusive(files):
    with pytest.raises(SystemExit):
        main(["gate", "--base-ref", "main", "--base-metrics", "x.json"])


def test_compare_orders_rows_like_params_and_gates_floor_only_metrics():
    gates = GatesParams(floors={"ROUGE-L": 0.3, "CIDEr": 0.5}, tolerances={"CIDEr": 0.05})
    result = gate.compare(EVALUATE_METRICS, gate.numeric(EVALUATE_METRICS), gates, "main")
    assert [row.metric for row in result.rows] == ["CIDEr", "ROUGE-L"]
    assert result.passed and result.exit_code == 0
    assert result.rows[1].tolerance is None
    # A floor-only metric is not held to the base: a drop passes while above the floor.
    lower = {**EVALUATE_METRICS, "ROUGE-L": 0.35}
    assert gate.compare(lower, gate.numeric(EVALUATE_METRICS), gates).passed


def test_the_project_gates_name_metrics_that_evaluate_writes():
    gates = load_section("gates", REPO_ROOT / "params.yaml")
    written = set(gate.numeric(EVALUATE_METRICS))
    assert set(gates.floors) <= written
    assert set(gates.tolerances) <= written
    assert gate.compare(EVALUATE_METRICS, None, gates).rows


# --- end to end: a git + DVC repo, base and PR commits, `dvc metrics diff` -----------------------

SCORE_SCRIPT = """\
import json, pathlib, yaml
quality = yaml.safe_load(open("params.yaml"))["model"]["quality"]
pathlib.Path("reports").mkdir(exist_ok=True)
metrics = {"BLEU-4": round(0.3 * quality, 4), "CIDEr": round(1.0 * quality, 4),
           "num_images": 10, "decoder": "greedy", "skipped": {}}
pathlib.Path("reports/metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
rows = ["epoch,loss,val_loss"] + [f"{e},{2 / (e * quality):.4f},{2.2 / (e * quality):.4f}"
                                  for e in range(1, 4)]
pathlib.Path("reports/train_history.csv").write_text("\\n".join(rows) + "\\n")
"""

# The tiny stage writes only these two: gate just them.
E2E_GATES = {
    "floors": {"BLEU-4": 0.2, "CIDEr": 0.5},
    "tolerances": {"BLEU-4": 0.02, "CIDEr": 0.05},
}

DVC_YAML = """\
stages:
  score:
    cmd: python score.py
    deps: [score.py]
    params: [model]
    outs:
      - reports/train_history.csv:
          cache: false
    metrics:
      - reports/metrics.json:
          cache: false
plots:
  - Training curves:
      x: epoch
      y:
        reports/train_history.csv: [loss, val_loss]
"""


class Repo:
    def __init__(self, root: Path):
        self.root = root
        self.env = pipeline_env(root.parent / "mlflow.db")

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(a) for a in args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check:
            assert done.returncode == 0, describe(done)
        return done

    def git(self, *args: str) -> str:
        return self.run("git", *GIT_USER, *args).stdout.strip()

    def set_quality(self, quality: float) -> None:
        params = {"model": {"quality": quality}, "gates": E2E_GATES}
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def gate(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(VENV_BIN / "captioning", "gate", *args, check=False)


@pytest.fixture
def repo(tmp_path) -> Repo:
    repo = Repo(tmp_path / "repo")
    repo.root.mkdir()
    (repo.root / "score.py").write_text(SCORE_SCRIPT)
    (repo.root / "dvc.yaml").write_text(DVC_YAML)
    repo.set_quality(1.0)
    repo.run("git", "init", "-q")
    repo.run(VENV_BIN / "dvc", "init", "-q")
    repo.run(VENV_BIN / "dvc", "config", "core.analytics", "false")
    return repo


@pytest.mark.slow
def test_gate_end_to_end_against_the_base_commit(repo):
    first = repo.commit("pipeline, not yet run")
    repo.run(VENV_BIN / "dvc", "repro")
    base = repo.commit("base: quality 1.0")

    # The first run on a branch: the base revision has no metrics, so floors only.
    done = repo.gate("--base-ref", first)
    assert done.returncode == 0, describe(done)
    assert f"reports/metrics.json does not exist at `{first}`" in done.stdout

    # The PR lowers quality: CIDEr drops 0.1 (tolerance 0.05), BLEU-4 0.03 (tolerance 0.02).
    repo.set_quality(0.9)
    repo.run(VENV_BIN / "dvc", "repro")
    repo.commit("PR: quality 0.9")
    done = repo.gate("--base-ref", base, "--out", "build/ci/gate.md")
    assert done.returncode == 1, describe(done)
    table = done.stdout
    assert f"Base: `{base}`" in table
    assert "Quality gate: failed (2 of 2: BLEU-4, CIDEr)" in table
    assert _row(table, "CIDEr")[1:] == [
        "1.0000",
        "0.9000",
        "-0.1000 (-10.0%)",
        "**fail**: dropped 0.1000 > tolerance 0.0500",
    ]
    assert (repo.root / "build/ci/gate.md").read_text() == table

    # The comment: this table, `dvc plots diff` against the base drawn as a PNG, overlays.
    overlays = repo.root / "reports/attention/overlays"
    overlays.mkdir(parents=True)
    _write_pngs(overlays, [42, 7, 1000, 5])
    done = repo.run(
        VENV_BIN / "python",
        "-m",
        "captioning.evaluation.ci_comment",
        "--base-ref",
        base,
        "--no-post",
    )
    comment = (repo.root / "build/ci/comment.md").read_text()
    assert comment.startswith(table.rstrip())
    assert "![training_curves](./training_curves.png)" in comment
    assert (repo.root / "build/ci/training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = [f"overlay-{i}.png" for i in (5, 7, 42)]
    assert all(f"](./{name})" in comment for name in shown)
    assert sorted(p.name for p in (repo.root / "build/ci").glob("overlay-*")) == sorted(shown)

    # A later PR that improves on the base passes, marked as improved.
    repo.set_quality(1.2)
    repo.run(VENV_BIN / "dvc", "repro")
    done = repo.gate("--base-ref", base)
    assert done.returncode == 0, describe(done)
    assert _row(done.stdout, "CIDEr")[4] == "improved"

    # An unknown revision cannot be gated against: exit 2, with dvc's reason.
    done = repo.gate("--base-ref", "no-such-branch")
    assert done.returncode == 2
    assert "unknown Git revision 'no-such-branch'" in done.stderr


def _write_pngs(folder: Path, ids: list[int]) -> None:
    from PIL import Image

    for image_id in ids:
        Image.new("RGB", (4, 4), (image_id % 256, 0, 0)).save(folder / f"{image_id}.png")


@pytest.mark.slow
def test_make_targets_run_the_same_gate_as_ci(repo):
    # The Makefile's CI targets in the tiny project: the project's venv and pyproject (older
    # than the venv, so `make install` has nothing to do) stand in for a contributor's checkout.
    shutil.copy2(REPO_ROOT / "Makefile", repo.root / "Makefile")
    shutil.copy2(REPO_ROOT / "pyproject.toml", repo.root / "pyproject.toml")
    os.utime(repo.root / "pyproject.toml", (0, 0))
    (repo.root / ".venv").symlink_to(VENV_BIN.parent)
    (repo.root / ".gitignore").write_text(".venv\nbuild/\n")
    repo.run(VENV_BIN / "dvc", "repro")
    base = repo.commit("base: quality 1.0")
    params_before = (repo.root / "params.yaml").read_text()

    repo.run("make", "repro-ci", "CI_PARAMS=model.quality=0.6")
    assert (repo.root / "params.yaml").read_text() == params_before  # left as it was
    assert json.loads((repo.root / "reports/metrics.json").read_text())["CIDEr"] == 0.6

    done = repo.run("make", "gate", f"BASE_REF={base}", check=False)
    assert done.returncode != 0, describe(done)
    table = (repo.root / "build/ci/gate.md").read_text()
    assert _row(table, "BLEU-4")[4] == (
        "**fail**: below floor 0.2000; dropped 0.1200 > tolerance 0.0200"
    )

    repo.run("make", "record-base")
    assert json.loads((repo.root / "build/ci/base/metrics.json").read_text())["CIDEr"] == 0.6
    done = repo.run("make", "gate", "BASE_DIR=build/ci/base", check=False)
    assert "Base: `build/ci/base/metrics.json`" in done.stdout
    assert _row(done.stdout, "CIDEr")[3:] == ["0", "pass"]

    done = repo.run("make", "ci-comment", "BASE_DIR=build/ci/base")
    comment = (repo.root / "build/ci/comment.md").read_text()
    assert comment.startswith("### Quality gate: failed")
    assert (repo.root / "build/ci/training_curves.png").exists()
