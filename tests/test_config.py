"""Typed params: one home for every default, and mapping-valued keys checked key by key.

The dataclasses of `captioning.config` hold each default; params.yaml repeats
every value, and code that needs a default (the model config, the decoder, the
CLI) reads it from them. These tests fail when two of those places disagree.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

from captioning.config import (
    SECTIONS,
    ConfigError,
    DecoderMethod,
    EvaluateParams,
    FeaturesParams,
    GatesParams,
    RegisterParams,
    TrainParams,
    ValidateParams,
    from_dict,
    load_section,
    read_params,
)
from captioning.data.images import DEFAULT_MAX_PIXELS

REPO_ROOT = Path(__file__).resolve().parents[1]
# Gates are this repository's policy for its own metrics, kept in params.yaml
# alone; GatesParams defaults to no gate (tested below).
POLICY_SECTIONS = {"gates"}


def _defaults(cls: type) -> dict:
    return dataclasses.asdict(cls())


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_params_yaml_names_every_field_of_its_section(section):
    raw = read_params(REPO_ROOT / "params.yaml")
    assert section in raw, f"params.yaml has no '{section}' section"
    fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
    assert sorted(raw[section] or {}) == sorted(fields)


@pytest.mark.parametrize("section", sorted(set(SECTIONS) - POLICY_SECTIONS))
def test_params_yaml_values_are_the_dataclass_defaults(section):
    raw = read_params(REPO_ROOT / "params.yaml")[section]
    cls = SECTIONS[section]
    defaults = _defaults(cls)
    differ = {k: (raw[k], defaults[k]) for k in raw if raw[k] != defaults.get(k)}
    assert not differ, f"{section}: params.yaml value vs dataclass default: {differ}"
    assert load_section(section, REPO_ROOT / "params.yaml") == cls()


def test_model_config_defaults_mirror_the_params():
    from captioning.model.captioner import ModelConfig

    mirrored = {
        "embedding_dim": (TrainParams, "embedding_dim"),
        "units": (TrainParams, "units"),
        "attention_units": (TrainParams, "attention_units"),
        "encoder_dim": (TrainParams, "encoder_dim"),
        "attention_penalty": (TrainParams, "attention_penalty"),
        "label_smoothing": (TrainParams, "label_smoothing"),
        "location_embedding": (TrainParams, "location_embedding"),
        "decoder": (TrainParams, "decoder"),
        "transformer_layers": (TrainParams, "transformer_layers"),
        "transformer_heads": (TrainParams, "transformer_heads"),
        "transformer_width": (TrainParams, "transformer_width"),
        "transformer_ff": (TrainParams, "transformer_ff"),
        "transformer_dropout": (TrainParams, "transformer_dropout"),
        "image_size": (FeaturesParams, "image_size"),
        "extractor_weights": (FeaturesParams, "weights"),
        "extractor_seed": (FeaturesParams, "seed"),
    }
    config = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    # A new ModelConfig field named like a train key is checked too.
    assert set(config) & set(_defaults(TrainParams)) <= set(mirrored)
    for name, (cls, key) in mirrored.items():
        assert config[name] == _defaults(cls)[key], f"ModelConfig.{name} != {cls.__name__}.{key}"


def test_model_config_feature_shape_is_the_extractors_at_the_default_image_size():
    import keras

    from captioning.model.captioner import ModelConfig

    side = FeaturesParams.image_size
    backbone = keras.applications.InceptionV3(
        include_top=False, weights=None, input_shape=(side, side, 3)
    )
    _, height, width, channels = backbone.output.shape  # (B, h, w, C)
    assert (ModelConfig.num_locations, ModelConfig.feature_dim) == (height * width, channels)


def test_decoding_defaults_are_the_evaluate_stages():
    from captioning.cli import build_parser
    from captioning.model.decode import CaptionDecoder
    from captioning.training.callbacks import ValCaptionScore

    evaluate = EvaluateParams()
    caption = build_parser().parse_args(["caption", "image.jpg"])
    assert caption.decoder == evaluate.decoder
    assert caption.beam_size == evaluate.beam_size
    assert caption.length_penalty == evaluate.length_penalty
    assert caption.max_len == evaluate.max_len
    assert caption.batch_size == FeaturesParams.batch_size  # images per extractor pass
    decode = inspect.signature(CaptionDecoder.decode).parameters
    for name, key in [
        ("method", "decoder"),
        ("max_len", "max_len"),
        ("beam_size", "beam_size"),
        ("temperature", "temperature"),
        ("batch_size", "batch_size"),
    ]:
        assert decode[name].default == getattr(evaluate, key), name
    assert typing.get_args(DecoderMethod) == ("greedy", "sample", "beam")
    scorer = inspect.signature(ValCaptionScore).parameters
    assert scorer["max_len"].default == evaluate.max_len
    assert scorer["batch_size"].default == evaluate.batch_size


def test_pixel_bounds_have_one_home():
    assert ValidateParams.max_pixels == DEFAULT_MAX_PIXELS
    # Served images meet the shape rules trained images met; the server's pixel bound may be tighter.
    assert RegisterParams.max_pixels <= ValidateParams.max_pixels
    assert RegisterParams.min_side == ValidateParams.min_side
    assert RegisterParams.max_aspect == ValidateParams.max_aspect
    assert RegisterParams.decode_budget_pixels >= RegisterParams.max_pixels


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
        ({"floors": {"CIDEr": "high"}}, "gates.floors.CIDEr = 'high': allowed: float, got str"),
        ({"floors": {"CIDEr": True}}, "gates.floors.CIDEr = True: allowed: float"),
        ({"floors": [0.5]}, "gates.floors = [0.5]: allowed: a mapping, got list"),
        ({"tolerances": None}, "gates.tolerances = None: allowed: a mapping"),
        ({"floors": {1: 0.5}}, "gates.floors key = 1: allowed: str, got int"),
        (
            {"floor": {"CIDEr": 0.5}},
            "gates.floor = {'CIDEr': 0.5}: unknown key in params section 'gates'",
        ),
    ],
)
def test_wrong_mappings_fail_loudly(raw, message):
    with pytest.raises(ConfigError) as err:
        from_dict(GatesParams, "gates", raw)
    assert message in str(err.value)


def _params_values() -> dict[str, list]:
    """{key: [its params.yaml value in every section that has it]}."""
    values: dict[str, list] = {}
    for section in read_params(REPO_ROOT / "params.yaml").values():
        for key, value in (section or {}).items():
            values.setdefault(key, []).append(value)
    return values


def _second_homes(classes, params_values) -> list[str]:
    """Fields of `classes` named like a params key whose default disagrees with params.yaml."""
    found = []
    for cls in classes:
        for field in dataclasses.fields(cls):
            if field.name not in params_values:
                continue
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                continue
            if default not in params_values[field.name]:
                found.append(
                    f"{cls.__module__}.{cls.__qualname__}.{field.name} = {default!r} "
                    f"(params.yaml: {params_values[field.name]})"
                )
    return found


def _package_dataclasses() -> list[type]:
    import importlib
    import pkgutil

    import captioning

    classes = []
    for module_info in pkgutil.walk_packages(captioning.__path__, "captioning."):
        if module_info.name == "captioning.serving.served_model":
            continue  # MLflow's model-from-code file: importing it registers a model
        module = importlib.import_module(module_info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                classes.append(obj)
    return [c for c in classes if c not in set(SECTIONS.values())]


def test_no_dataclass_in_the_package_is_a_second_home_for_a_params_default():
    classes = _package_dataclasses()
    assert len(classes) > 5  # the walk reached the package's modules
    assert _second_homes(classes, _params_values()) == []


def test_the_second_home_check_catches_a_default_added_to_a_dataclass():
    @dataclasses.dataclass
    class Rule:
        smoothing_epochs: int = 1  # params.yaml says 3

    @dataclasses.dataclass
    class Fine:
        smoothing_epochs: int = TrainParams.smoothing_epochs
        monitor: str = "not a params key"

    found = _second_homes([Rule, Fine], _params_values())
    assert len(found) == 1 and "Rule.smoothing_epochs = 1" in found[0]
