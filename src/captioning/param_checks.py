"""How one params section is checked against its dataclass: keys, types, then ranges.

`section_problems` goes through a section's mapping key by key and collects
every problem: a key that is gone (`REPLACED` says what took its place), an
unknown key (naming the closest known one), a value of the wrong type (a value
is coerced only where that is lossless: 1 for a float, never true for an int),
and a value out of its range (`captioning.param_bounds`). `from_dict` builds
the dataclass or raises `ConfigError` with the first problem.
`captioning.config` holds the dataclasses and uses these for every section and
for the whole file. Every message reads `section.key = value: allowed ...`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from captioning.param_bounds import bound_problems

T = TypeVar("T")


class ConfigError(ValueError):
    """A params section does not match its dataclass."""


def _check_type(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Return `value` coerced to `annotation` where that is lossless, else raise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(section, key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} = {value!r}: allowed: one of {list(allowed)}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(
                f"{section}.{key} = {value!r}: allowed: a mapping, got {type(value).__name__}"
            )
        return {
            _check_type(section, f"{key} key", k, key_type): _check_type(
                section, f"{key}.{k}", v, value_type
            )
            for k, v in value.items()
        }
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        # bool is an int subclass; `epochs: true` is a mistake, not 1.
        if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
            return value
        raise ConfigError(
            f"{section}.{key} = {value!r}: allowed: {annotation.__name__}, "
            f"got {type(value).__name__}"
        )
    raise ConfigError(f"{section}.{key}: unsupported annotation {annotation!r}")


# Keys earlier versions had, and what replaced them.
REPLACED = {
    ("train", "epochs"): "the training budget is train.budget_pairs (caption pairs, "
    "whatever the data size; an epoch is train.epoch_pairs pairs)",
    ("train", "early_stopping_patience"): "patience is train.early_stopping_pairs "
    "(caption pairs without improvement of the smoothed val metric)",
}


def section_problems(cls: type, section: str, raw: dict[str, Any]) -> tuple[dict, list[str]]:
    """Check one section's mapping key by key: (the values that passed, every problem found)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        if (section, key) in REPLACED:
            problems.append(f"{section}.{key} is gone: {REPLACED[section, key]}")
        elif key not in names:
            problems.append(unknown_key_message(section, key, value, names))
        else:
            try:
                values[key] = _check_type(section, key, value, hints[key])
            except ConfigError as err:
                problems.append(str(err))
    # Ranges are checked on the values as written (0, not the coerced 0.0), for the message.
    return values, problems + bound_problems(section, {k: raw[k] for k in values})


def from_dict(cls: type[T], section: str, raw: dict[str, Any] | None) -> T:
    """Build dataclass `cls` from a mapping; unknown keys, wrong types and bad ranges fail."""
    values, problems = section_problems(cls, section, dict(raw or {}))
    if problems:
        raise ConfigError(problems[0])
    return cls(**values)


def unknown_key_message(section: str, key: str, value: Any, known: Iterable[str]) -> str:
    """`section.key = value: unknown key ...`, naming the closest known key when one is close."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"did you mean {section}.{close[0]}?" if close else f"known: {sorted(known)}"
    return f"{section}.{key} = {value!r}: unknown key in params section '{section}'; {hint}"
