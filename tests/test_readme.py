"""The README stays true: its links, commands, results table and layout tree match the repository.

The README is the user's first document, so what it shows must work as
written: every relative link (and `#anchor`) resolves, every `make X` is a
documented Makefile target, every `captioning SUB --flag` exists in the CLI's
argparse definition, the results table repeats the committed
`reports/metrics.json` to three decimals, and the layout tree names every
tracked top-level path and every module and subpackage of `src/captioning`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from captioning.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Paths a repository has but its own README need not list in its tree.
UNLISTED = {"README.md", ".gitignore"}


def _code() -> str:
    """The README's fenced blocks and inline code spans, where commands are shown."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", README, re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", README, flags=re.M | re.S)
    return "\n".join(fenced + re.findall(r"`([^`\n]+)`", prose))


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    body = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", body, re.M)}


def test_relative_links_and_anchors_resolve():
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(file.read_text()):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


def test_every_make_target_it_shows_is_a_documented_target():
    makefile = (ROOT / "Makefile").read_text()
    documented = set(re.findall(r"^([a-zA-Z_-]+):.*?## ", makefile, re.M))
    shown = set(re.findall(r"\bmake ([a-z][a-z-]*)", _code()))
    assert shown, "the README shows no make command"
    assert shown <= documented, f"not `## `-documented Makefile targets: {shown - documented}"


def test_every_captioning_command_and_flag_it_shows_exists():
    subcommands = next(
        action.choices
        for action in build_parser()._actions  # argparse keeps its subparsers only here
        if hasattr(action, "choices") and isinstance(action.choices, dict)
    )
    code = _code().replace("\\\n", " ")
    calls = re.findall(r"(?:^|\s|/)captioning ([a-z]+)([^\n#]*)", code)
    assert calls, "the README shows no captioning command"
    for sub, rest in calls:
        assert sub in subcommands, f"`captioning {sub}` is not a subcommand"
        known = set(subcommands[sub]._option_string_actions)
        for flag in (word for word in shlex.split(rest) if word.startswith("--")):
            assert flag in known, f"`captioning {sub}` has no {flag}"


def _committed(path: str) -> str:
    done = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no git history to read the committed {path} from")
    return done.stdout


def _cells(label: str) -> dict[str, str]:
    """The results table's row `label` as {column: figure}, empty cells left out."""
    rows = {
        cells[0]: cells[1:]
        for line in README.splitlines()
        if line.startswith("| ") and not line.startswith("|---")
        for cells in [[cell.strip() for cell in line.strip().strip("|").split("|")]]
    }
    header = rows["120 test images"]
    return {column: figure for column, figure in zip(header, rows[label], strict=True) if figure}


def test_results_table_repeats_the_committed_metrics():
    # The committed file, not the workspace's: a local `make repro` on another CPU
    # moves the third decimal, and that run is not the one the README reports.
    metrics = json.loads(_committed("reports/metrics.json"))
    model = _cells("model, greedy")
    assert len(model) == 9, model
    assert model == {name: f"{metrics[name]:.3f}" for name in model}
    human = _cells("one human reference vs the other four")
    assert human == {name: f"{metrics['human_' + name]:.3f}" for name in human}
    assert _cells("uniform attention") == {"grounding": f"{metrics['grounding_chance']:.3f}"}
    assert f"{metrics['num_images']} test images" in README


def test_layout_tree_names_every_tracked_path_and_package_unit():
    tree = README.split("## Layout", 1)[1].split("```")[1]
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    top = {line.split("/")[0] + ("/" if "/" in line else "") for line in done.stdout.split()}
    missing = [p for p in sorted(top - UNLISTED) if p not in tree]
    package = ROOT / "src" / "captioning"
    units = [f"  {p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    units += [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    missing += [unit.strip() for unit in units if unit not in tree]
    assert not missing, f"the README's layout tree lacks {missing}"
