"""Typed parameters: one frozen dataclass per section of params.yaml.

Every stage reads its own section(s) through `load_section`, which fails loudly
on unknown keys, missing keys and values of the wrong type, so a typo in
`dvc exp run -S train.lerning_rate=...` stops the run instead of being ignored.
The same dataclasses travel inside the saved model (`model_config` in
`captioning.model`), so a checkpoint always knows the settings that made it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class ConfigError(ValueError):
    """A params section does not match its dataclass."""


@dataclasses.dataclass(frozen=True)
class DataParams:
    source: Literal["demo", "local", "coco2014", "flickr8k", "flickr30k"] = "demo"
    path: str | None = None
    seed: int = 2014
    demo_train_images: int = 2000
    demo_val_images: int = 240
    # Downloaded sources (captioning.data.fetch); None means the official host/URL.
    base_url: str | None = None
    subset: int | None = None
    images_url: str | None = None
    karpathy_url: str | None = None
    download_workers: int = 8
    download_retries: int = 5


@dataclasses.dataclass(frozen=True)
class SplitParams:
    seed: int = 7
    val_fraction: float = 0.5
    max_train_images: int | None = None
    max_val_images: int | None = None
    max_test_images: int | None = None
    scheme: Literal["coco", "karpathy"] = "coco"


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    max_pixels: int = 89_478_485
    max_quarantine_fraction: float = 0.05
    min_caption_words: int = 1
    max_caption_words: int = 60


@dataclasses.dataclass(frozen=True)
class FeaturesParams:
    weights: str = "none"
    image_size: int = 299
    batch_size: int = 32
    shard_size: int = 1024
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    vocab_size: int = 5000
    max_len: int = 40


@dataclasses.dataclass(frozen=True)
class TrainParams:
    embedding_dim: int = 256
    units: int = 512
    attention_units: int = 512
    encoder_dim: int = 256
    # A learned embedding per feature-map location added to the encoded features.
    location_embedding: bool = False
    batch_size: int = 64
    # Image-major batches: K captions per image share one encoder pass (0: one row per caption).
    captions_per_image: int = 1
    epochs: int = 15
    learning_rate: float = 1e-3
    # Decay over `epochs` (cosine down to lr_min_fraction * learning_rate) or constant.
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_min_fraction: float = 0.02
    clip_norm: float = 5.0  # global gradient-norm clipping; 0 turns it off
    label_smoothing: float = 0.0
    attention_penalty: float = 1.0
    # Best checkpoint and early stopping: val CIDEr (greedy captions of a fixed
    # val sample, each epoch) or val loss.
    select_by: Literal["val_CIDEr", "val_loss"] = "val_CIDEr"
    val_sample_images: int = 120
    early_stopping_patience: int = 3
    seed: int = 42
    jit_compile: bool = True
    deterministic: bool = False


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    split: Literal["train", "val", "test"] = "test"
    decoder: Literal["greedy", "sample", "beam"] = "greedy"
    beam_size: int = 3
    length_penalty: float = 1.0
    temperature: float = 1.0
    max_len: int = 40
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    model_name: str = "image-captioner"
    max_batch: int = 16
    max_pixels: int = 89_478_485


@dataclasses.dataclass(frozen=True)
class ReportParams:
    num_images: int = 8
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class GatesParams:
    """`captioning gate`: absolute floors and allowed drops against the base branch.

    Both map a metric name of reports/metrics.json to a number in that metric's
    own units; every metric is higher-is-better. A tolerance is an absolute drop
    (0.02 BLEU-4 points), not a relative one, so it stays meaningful near zero.
    """

    floors: dict[str, float] = dataclasses.field(default_factory=dict)
    tolerances: dict[str, float] = dataclasses.field(default_factory=dict)


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "split": SplitParams,
    "validate": ValidateParams,
    "features": FeaturesParams,
    "tokenize": TokenizeParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "report": ReportParams,
    "register": RegisterParams,
    "gates": GatesParams,
}

T = TypeVar("T")


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
            raise ConfigError(f"{section}.{key}={value!r}: expected one of {list(allowed)}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(
                f"{section}.{key}={value!r}: expected a mapping, got {type(value).__name__}"
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
            f"{section}.{key}={value!r}: expected {annotation.__name__}, got {type(value).__name__}"
        )
    raise ConfigError(f"{section}.{key}: unsupported annotation {annotation!r}")


def from_dict(cls: type[T], section: str, raw: dict[str, Any] | None) -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types fail."""
    raw = dict(raw or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in params section '{section}': {unknown}; known: {sorted(names)}"
        )
    values = {k: _check_type(section, k, v, hints[k]) for k, v in raw.items()}
    return cls(**values)


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole params file as a mapping (empty file -> empty mapping)."""
    with open(path, encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_section(name: str, path: str | Path = "params.yaml", cls: type[T] | None = None) -> T:
    """Load params section `name` as its dataclass (see SECTIONS)."""
    cls = cls or SECTIONS[name]
    params = read_params(path)
    if name not in params:
        raise ConfigError(f"{path}: missing section '{name}'")
    return from_dict(cls, name, params[name])


def to_flat_dict(**sections: Any) -> dict[str, Any]:
    """`{'train.units': 512, ...}` for MLflow params from dataclass instances."""
    flat: dict[str, Any] = {}
    for name, section in sections.items():
        for key, value in dataclasses.asdict(section).items():
            flat[f"{name}.{key}"] = value
    return flat
