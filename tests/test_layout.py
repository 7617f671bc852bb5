"""The package's layers: each subpackage imports only those below it, so there are no cycles.

The order is the one docs/design.md's package map gives.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "captioning"
# Lowest first; a unit may import any unit in an earlier layer.
LAYERS = [
    {"param_bounds"},
    {"param_checks"},
    {"config", "atomic_files", "server_process", "spark_session"},
    {"errors", "params_restore", "dvc_cache"},
    {"data"},
    {"features"},
    {"model"},
    {"evaluation"},
    {"training"},
    {"tracking"},
    {"serving"},
    {"cli"},
]
IMPORT = re.compile(r"^\s*(?:from|import) captioning\.(\w+)", re.M)


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units == set().union(*LAYERS)


def test_subpackages_import_only_lower_layers():
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    upward = []
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(path)
        if unit == "__init__":
            continue
        for target in IMPORT.findall(path.read_text()):
            if target != unit and rank[target] >= rank[unit]:
                upward.append(f"{path.relative_to(PACKAGE)} imports captioning.{target}")
    assert upward == []


def test_every_subpackage_says_what_it_is_for():
    for init in PACKAGE.glob("*/__init__.py"):
        text = init.read_text()
        assert text.startswith('"""') and len(text.split('"""')[1]) > 80, init


def test_no_data_set_is_known_by_name_outside_data():
    """Data-set-specific scores come through the source's scorer plug-in (`data.scorers`)."""
    specific = re.compile(r"^\s*(?:from|import) captioning\.data\.(demo\w*|coco\w*|flickr)", re.M)
    offenders = [
        f"{path.relative_to(PACKAGE)} imports captioning.data.{name}"
        for path in PACKAGE.rglob("*.py")
        if _unit(path) != "data"
        for name in specific.findall(path.read_text())
    ]
    assert offenders == []
