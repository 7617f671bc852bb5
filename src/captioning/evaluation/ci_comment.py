"""The pull-request comment CI posts: the gate's table, training curves and attention overlays.

`python -m captioning.evaluation.ci_comment` (wrapped by `make ci-comment`) writes
`build/ci/comment.md` beside the images it shows: one PNG per plot of
dvc.yaml, DVC's own Vega-Lite templates filled by `dvc plots diff --json` (this
run against the base) and rendered by vl-convert, and a few attention overlays copied from `reports/attention/overlays/`. Then
it delivers the comment, best first:

1. on a pull request with a token (`PR_NUMBER` and `GH_TOKEN`): CML when `cml`
   is installed (it uploads the images, so they show inline), else the GitHub
   CLI, which cannot upload images, so they become file names and a link to
   the workflow run, whose `ci-report` artifact holds them;
2. the job summary (`GITHUB_STEP_SUMMARY`) whenever GitHub Actions provides
   one, so a fork's PR, whose token may not comment, still shows the table;
3. always stdout.

Delivery never fails the job: the gate step does that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WATERMARK = "captioning quality gate"
OVERLAYS_SHOWN = 3
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


# --- training curves ----------------------------------------------------------------------------


def dvc_plots(base_ref: str | None) -> dict[str, Any]:
    """`dvc plots diff BASE_REF --json` (Vega-Lite specs with their data), or `dvc plots show`."""
    command = ["plots", "diff", base_ref] if base_ref else ["plots", "show"]
    done = subprocess.run([_dvc(), *command, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(command)}` failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def vega_specs(payload: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{plot title: the Vega-Lite spec dvc rendered from dvc.yaml's template, data inline}."""
    return {
        title: render["content"]
        for title, renders in (payload.get("data") or {}).items()
        for render in renders[:1]
        if render.get("type") == "vega"
    }


def _rev_label(rev: str, base_ref: str | None) -> str:
    if rev == "workspace":
        return "this run"
    if rev == base_ref:
        return f"base {rev[:12] if re.fullmatch(r'[0-9a-f]{40}', rev) else rev}"
    return rev


def with_base(
    spec: dict[str, Any], base_ref: str | None, base_history: Path | None
) -> dict[str, Any]:
    """The spec with readable revision names, plus the base run CI recorded (what dvc cannot see).

    dvc colours by `rev` with an explicit domain; the recorded base joins it
    as rev "base", its rows in dvc's own shape (x field, field, value).
    """
    spec = json.loads(json.dumps(spec))
    values = spec["data"]["values"]
    for row in values:
        row["rev"] = _rev_label(row["rev"], base_ref)
    if base_history is not None and base_history.exists():
        import pandas as pd

        x = spec["encoding"]["x"]["field"]
        fields = list(dict.fromkeys(r["field"] for r in values))
        table = pd.read_csv(base_history)
        values += [
            {x: str(row[x]), "rev": "base", "field": f, "dvc_inferred_y_value": str(row[f])}
            for f in fields
            if f in table.columns
            for row in table.to_dict("records")
        ]
    scale = spec.get("encoding", {}).get("color", {}).get("scale", {})
    if "domain" in scale:
        scale["domain"] = list(dict.fromkeys(r["rev"] for r in values))
        scale.pop("range", None)  # Vega-Lite's own palette covers any number of revisions
    return spec


def training_curves(
    out_dir: Path, base_ref: str | None = None, base_history: Path | None = None
) -> tuple[list[Path], list[str]]:
    """PNG files of dvc.yaml's plots (this run vs the base) and notes on what is missing.

    DVC fills its templates (`dvc plots diff --json`); vl-convert renders the
    Vega-Lite to PNG, the way CML's recipe pipes `--show-vega` into vl2png.
    With `base_ref` the base comes from `dvc plots diff`; with `base_history`
    (a CSV CI recorded for the base commit) from that file.
    """
    try:
        payload = dvc_plots(base_ref)
    except (RuntimeError, json.JSONDecodeError, OSError) as err:
        return [], [f"Training curves unavailable: {err}"]
    import vl_convert

    notes = [f"{e['name']} at {e['rev']}: {e['msg']}" for e in payload.get("errors") or []]
    images = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, spec in enumerate(vega_specs(payload).values()):
        name = "training_curves.png" if index == 0 else f"plot-{index}.png"
        png = vl_convert.vegalite_to_png(with_base(spec, base_ref, base_history), scale=1)
        (out_dir / name).write_bytes(png)
        images.append(out_dir / name)
    return images, notes


# --- attention overlays -------------------------------------------------------------------------


def pick_overlays(folder: Path, count: int = OVERLAYS_SHOWN) -> list[Path]:
    """The first `count` overlays by image id: the same test images in every run's comment."""
    if not folder.is_dir():
        return []

    def key(path: Path) -> tuple[int, str]:
        return (int(path.stem), "") if path.stem.isdigit() else (sys.maxsize, path.stem)

    return sorted(folder.glob("*.png"), key=key)[:count]


# --- the comment --------------------------------------------------------------------------------


def build_comment(
    gate_markdown: str | None,
    curves: Sequence[Path],
    overlays: Sequence[Path],
    notes: Sequence[str] = (),
    footer: str = "",
) -> str:
    """The comment's Markdown; image paths are file names relative to the comment file."""
    parts = [gate_markdown.rstrip() if gate_markdown else "### Quality gate: did not run"]
    parts.append("### Training curves")
    if curves:
        parts.append(" ".join(f"![{p.stem}](./{p.name})" for p in curves))
    parts += [f"- {note}" for note in notes] or ([] if curves else ["- no plots"])
    parts.append(f"### Attention ({len(overlays)} test images)")
    if overlays:
        parts.append(
            " ".join(
                f"![attention, image {p.stem.removeprefix('overlay-')}](./{p.name})"
                for p in overlays
            )
        )
    else:
        parts.append("- no overlays in reports/attention/overlays")
    if footer:
        parts.append(f"<sub>{footer}</sub>")
    return "\n\n".join(parts) + "\n"


def without_images(markdown: str, link: str | None) -> str:
    """`markdown` with local images replaced by their names (and a link to where they are)."""
    where = f" in the [run's artifact]({link})" if link else " in the run's artifact"
    replaced = _IMAGE.sub(lambda m: f"`{Path(m.group(2)).name}`", markdown)
    if replaced != markdown:
        replaced += f"\nImages: see the files above{where}.\n"
    return replaced


def _run_url(env: Mapping[str, str]) -> str | None:
    """The GitHub Actions run's page (its artifacts are listed there), or None outside one."""
    if not (env.get("GITHUB_RUN_ID") and env.get("GITHUB_REPOSITORY")):
        return None
    server = env.get("GITHUB_SERVER_URL", "https://github.com")
    return f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"


def _footer(env: Mapping[str, str]) -> str:
    run = _run_url(env)
    if run:
        sha = env.get("GITHUB_SHA", "")[:12]
        return f"commit {sha} · [workflow run]({run}) · `make gate` reproduces the table"
    return "`make gate` reproduces the table"


def _post(comment: Path, pr: str, token: str, run_url: str | None, repo: str | None) -> str:
    """Post or update the PR comment; returns how. Raises CalledProcessError/OSError."""
    env = {**os.environ, "GH_TOKEN": token, "REPO_TOKEN": token}
    if shutil.which("cml"):
        subprocess.run(
            [
                "cml",
                "comment",
                "update",
                f"--target=pr/{pr}",
                f"--watermark-title={WATERMARK}",
                str(comment),
            ],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        return "cml"
    body = comment.with_name("comment-text.md")
    body.write_text(f"<!-- {WATERMARK} -->\n" + without_images(comment.read_text(), run_url))
    subprocess.run(
        ["gh", "pr", "comment", pr, "--body-file", str(body), "--edit-last", "--create-if-none"]
        + (["--repo", repo] if repo else []),
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    return "gh"


def deliver(comment: Path, env: Mapping[str, str]) -> list[str]:
    """Send the comment everywhere it can go (see the module docstring); returns where."""
    done = []
    text = comment.read_text()
    pr, token = env.get("PR_NUMBER", ""), env.get("GH_TOKEN") or env.get("GITHUB_TOKEN", "")
    run = _run_url(env)
    if pr and token:
        try:
            done.append(
                f"pr comment ({_post(comment, pr, token, run, env.get('GITHUB_REPOSITORY'))})"
            )
        except (subprocess.CalledProcessError, OSError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            print(f"::warning::could not comment on PR {pr}: {detail.strip()[:500]}")
    summary = env.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(without_images(text, run) + "\n")
        done.append("job summary")
    print(text)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", default="build/ci/gate.md", help="`captioning gate --out` file")
    parser.add_argument("--out-dir", default="build/ci", help="where comment.md and images go")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--base-ref", help="git revision for `dvc plots diff`")
    base.add_argument("--base-history", help="the base run's train_history.csv (recorded by CI)")
    parser.add_argument("--overlays", default="reports/attention/overlays")
    parser.add_argument("--no-post", action="store_true", help="only write comment.md")
    args = parser.parse_args(argv)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gate_file = Path(args.gate)
    gate_markdown = gate_file.read_text() if gate_file.exists() else None
    history = Path(args.base_history) if args.base_history else None
    curves, notes = training_curves(out_dir, args.base_ref, history)
    overlays = []
    for source in pick_overlays(Path(args.overlays)):
        overlays.append(Path(shutil.copy2(source, out_dir / f"overlay-{source.name}")))
    comment = out_dir / "comment.md"
    comment.write_text(build_comment(gate_markdown, curves, overlays, notes, _footer(os.environ)))
    if args.no_post:
        print(comment.read_text())
        return 0
    where = deliver(comment, os.environ)
    print(f"ci-comment: {comment} -> {', '.join(where) or 'stdout'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
