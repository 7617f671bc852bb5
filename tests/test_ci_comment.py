"""The CI comment: its Markdown, dvc's plots rendered to PNG, and where it is delivered.

The curves come from a real `dvc plots diff` in a temp git + DVC repo with a
base commit. Delivery runs against a fake `gh` on PATH that records its
arguments, so nothing reaches GitHub. `test_gate.py` builds a comment from a real
`dvc plots diff` end to end.
"""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from captioning.evaluation import ci_comment

GATE_TABLE = "### Quality gate: passed (1 metrics, 0 improved)\n\n| metric | base | PR |\n"


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                   check=True, capture_output=True)  # fmt: skip


HISTORY = "pairs_seen,loss,val_loss\n100,{a},{b}\n200,{c},{d}\n"


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory):
    """A real git + DVC repo: a base commit, then this run's history in the workspace."""
    root = tmp_path_factory.mktemp("pr")
    _git(root, "init", "-q")
    subprocess.run([ci_comment._dvc(), "init", "-q"], cwd=root, check=True)
    (root / "reports").mkdir()
    (root / "dvc.yaml").write_text(
        "plots:\n  - Training loss:\n      template: linear\n      x: pairs_seen\n"
        "      y:\n        reports/h.csv: [loss, val_loss]\n"
    )
    (root / "reports" / "h.csv").write_text(HISTORY.format(a=3.0, b=3.2, c=2.0, d=2.5))
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "base")
    (root / "reports" / "h.csv").write_text(HISTORY.format(a=2.5, b=3.0, c=1.5, d=2.1))
    return root


@pytest.mark.slow
def test_curves_are_dvc_plots_diff_rendered_to_png(two_commits, tmp_path, monkeypatch):
    monkeypatch.chdir(two_commits)
    payload = ci_comment.dvc_plots("HEAD")
    [(title, spec)] = ci_comment.vega_specs(payload).items()
    assert title == "Training loss"
    labelled = ci_comment.with_base(spec, "HEAD", None)
    revs = {r["rev"] for r in labelled["data"]["values"]}
    assert revs == {"this run", "base HEAD"}
    assert labelled["encoding"]["color"]["scale"]["domain"] == ["this run", "base HEAD"]
    [png], notes = ci_comment.training_curves(tmp_path, "HEAD")
    assert notes == [] and png.name == "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Drawn from both revisions: not the picture of this run alone.
    [alone], _ = ci_comment.training_curves(tmp_path / "alone")
    assert png.stat().st_size != alone.stat().st_size


@pytest.mark.slow
def test_a_recorded_base_history_joins_dvc_plot(two_commits, tmp_path, monkeypatch):
    monkeypatch.chdir(two_commits)
    history = tmp_path / "base.csv"
    history.write_text(HISTORY.format(a=4.0, b=4.2, c=3.0, d=3.5) + "300,2.0,2.9\n")
    [spec] = ci_comment.vega_specs(ci_comment.dvc_plots(None)).values()
    values = ci_comment.with_base(spec, None, history)["data"]["values"]
    base = [(r["field"], r["pairs_seen"], r["dvc_inferred_y_value"]) for r in values
            if r["rev"] == "base"]  # fmt: skip
    assert base[:3] == [("loss", "100", "4.0"), ("loss", "200", "3.0"), ("loss", "300", "2.0")]
    assert len(base) == 6
    [png], _ = ci_comment.training_curves(tmp_path, None, history)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pick_overlays_takes_the_lowest_image_ids(tmp_path):
    for name in ("300.png", "12.png", "7.png", "1000.png", "index.html"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in ci_comment.pick_overlays(tmp_path)] == ["7.png", "12.png", "300.png"]
    assert ci_comment.pick_overlays(tmp_path / "absent") == []


def test_comment_has_table_curves_overlays_and_footer():
    text = ci_comment.build_comment(
        GATE_TABLE,
        [Path("build/ci/training_curves.png")],
        [Path("build/ci/overlay-7.png")],
        ["Training curves at main: file missing"],
        "commit abc",
    )
    assert text.startswith(GATE_TABLE.rstrip())
    assert "![training_curves](./training_curves.png)" in text
    assert "- Training curves at main: file missing" in text
    assert "### Attention (1 test images)" in text
    assert "![attention, image 7](./overlay-7.png)" in text
    assert text.rstrip().endswith("<sub>commit abc</sub>")


def test_comment_says_when_the_gate_did_not_run():
    text = ci_comment.build_comment(None, [], [])
    assert "### Quality gate: did not run" in text
    assert "- no plots" in text and "- no overlays" in text


def test_without_images_points_at_the_run():
    text = "a ![curves](./training_curves.png) b"
    replaced = ci_comment.without_images(text, "https://example.invalid/run/1")
    assert "`training_curves.png`" in replaced and "![" not in replaced
    assert "[run's artifact](https://example.invalid/run/1)" in replaced
    assert ci_comment.without_images("no images", None) == "no images"


@pytest.fixture
def fake_gh(tmp_path, monkeypatch):
    """A `gh` that records its arguments (and exits with $FAKE_GH_EXIT); no `cml` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gh.log"
    script = bin_dir / "gh"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {log}\n'
        f'printf "%s\\n" "$GH_TOKEN" >> {log}\n'
        'echo "gh: forbidden" >&2\n'
        'exit "${FAKE_GH_EXIT:-0}"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    return log


def _comment(tmp_path: Path) -> Path:
    comment = tmp_path / "ci" / "comment.md"
    comment.parent.mkdir()
    comment.write_text(GATE_TABLE + "\n![training_curves](./training_curves.png)\n")
    return comment


def test_deliver_comments_on_the_pr_and_writes_the_job_summary(tmp_path, fake_gh, capsys):
    comment, summary = _comment(tmp_path), tmp_path / "summary.md"
    env = {
        "PR_NUMBER": "7",
        "GH_TOKEN": "token-value",
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_SERVER_URL": "https://github.example",
        "GITHUB_REPOSITORY": "org/repo",
        "GITHUB_RUN_ID": "99",
    }
    assert ci_comment.deliver(comment, env) == ["pr comment (gh)", "job summary"]
    args = fake_gh.read_text().splitlines()
    assert args[:5] == [
        "pr",
        "comment",
        "7",
        "--body-file",
        str(comment.with_name("comment-text.md")),
    ]
    assert "--edit-last" in args and "--create-if-none" in args
    assert args[args.index("--repo") + 1] == "org/repo"
    assert args[-1] == "token-value"
    body = comment.with_name("comment-text.md").read_text()
    assert body.startswith(f"<!-- {ci_comment.WATERMARK} -->")
    assert "https://github.example/org/repo/actions/runs/99" in body
    assert GATE_TABLE.strip() in summary.read_text()
    assert GATE_TABLE.strip() in capsys.readouterr().out


def test_deliver_on_a_fork_falls_back_to_the_job_summary(tmp_path, fake_gh, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_GH_EXIT", "1")  # a fork's read-only token: gh fails
    comment, summary = _comment(tmp_path), tmp_path / "summary.md"
    env = {"PR_NUMBER": "7", "GITHUB_TOKEN": "read-only", "GITHUB_STEP_SUMMARY": str(summary)}
    assert ci_comment.deliver(comment, env) == ["job summary"]
    assert "::warning::could not comment on PR 7: gh: forbidden" in capsys.readouterr().out
    assert "Quality gate: passed" in summary.read_text()


def test_deliver_without_token_or_pr_only_prints(tmp_path, fake_gh, capsys):
    comment = _comment(tmp_path)
    assert ci_comment.deliver(comment, {"PR_NUMBER": "7"}) == []
    assert not fake_gh.exists()
    assert "Quality gate: passed" in capsys.readouterr().out


def test_main_writes_the_comment_without_dvc_plots(tmp_path, monkeypatch, capsys):
    # Outside a DVC project there are no plots; the rest of the comment is still written.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gate.md").write_text(GATE_TABLE)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    (overlays / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code = ci_comment.main(
        ["--gate", "gate.md", "--out-dir", "out", "--overlays", str(overlays), "--no-post"]
    )
    assert code == 0
    text = (tmp_path / "out" / "comment.md").read_text()
    assert "- no plots" in text
    assert (tmp_path / "out" / "overlay-3.png").exists()
    assert json.dumps(text)  # plain text, printable
    assert "Quality gate: passed" in capsys.readouterr().out


def test_deliver_prefers_cml_which_uploads_the_images(tmp_path, fake_gh):
    cml_log = tmp_path / "cml.log"
    cml = fake_gh.parent / "bin" / "cml"
    cml.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {cml_log}\nprintf "%s\\n" "$REPO_TOKEN" >> {cml_log}\n'
    )
    cml.chmod(cml.stat().st_mode | stat.S_IEXEC)
    comment = _comment(tmp_path)
    assert ci_comment.deliver(comment, {"PR_NUMBER": "7", "GH_TOKEN": "t"}) == ["pr comment (cml)"]
    assert cml_log.read_text().splitlines() == [
        "comment",
        "update",
        "--target=pr/7",
        f"--watermark-title={ci_comment.WATERMARK}",
        str(comment),
        "t",
    ]
    assert not fake_gh.exists()
