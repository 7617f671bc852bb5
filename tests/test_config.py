"""Typed params: mapping-valued keys (the `gates:` section) are checked key by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioning.config import SECTIONS, ConfigError, GatesParams, from_dict, load_section

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gates_section_of_the_project_params_loads():
    gates = load_section("gates", REPO_ROOT / "params.yaml")
    assert isinstance(gates, GatesParams)
    assert SECTIONS["gates"] is GatesParams
    assert gates.floors and gates.tolerances
    assert all(isinstance(v, float) for v in [*gates.floors.values(), *gates.tolerances.values()])


def test_dict_values_are_coerced_like_scalars():
    gates = from_dict(GatesParams, "gates", {"floors": {"CIDEr": 1}, "tolerances": {}})
    assert gates.floors == {"CIDEr": 1.0}
    assert isinstance(gates.floors["CIDEr"], float)
    assert gates.tolerances == {}


def test_missing_dict_keys_default_to_empty_and_are_not_shared():
    first, second = GatesParams(), from_dict(GatesParams, "gates", {})
    assert first.floors == second.floors == {}
    assert first.floors is not second.floors


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"floors": {"CIDEr": "high"}}, "gates.floors.CIDEr='high': expected float, got str"),
        ({"floors": {"CIDEr": True}}, "gates.floors.CIDEr=True: expected float"),
        ({"floors": [0.5]}, "gates.floors=[0.5]: expected a mapping, got list"),
        ({"tolerances": None}, "gates.tolerances=None: expected a mapping"),
        ({"floors": {1: 0.5}}, "gates.floors key=1: expected str, got int"),
        ({"floor": {"CIDEr": 0.5}}, "unknown key(s) in params section 'gates': ['floor']"),
    ],
)
def test_wrong_mappings_fail_loudly(raw, message):
    with pytest.raises(ConfigError) as err:
        from_dict(GatesParams, "gates", raw)
    assert message in str(err.value)
