"""The allowed range of every numeric parameter, and the rules that tie two keys together.

`captioning.param_checks` checks each key's type; this table says which values of
that type make sense (a budget above 0, a size of at least 1, a probability in
[0, 1]), so `train.budget_pairs=-5` fails before anything trains instead of
training one epoch and registering the result. Keys that are not here take any
value of their type; `None` (an optional cap left unset) is always allowed.
Messages have one form, `section.key = value: allowed ...`, because the check
stage prints them as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Bound:
    """An interval; `low`/`high` None means unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False

    def allows(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return math.isfinite(value) and above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a number in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"a number {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"a number {'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


POSITIVE = Bound(0, low_open=True)
AT_LEAST_0 = Bound(0)
AT_LEAST_1 = Bound(1)
FRACTION = Bound(0, 1)  # a probability or share, both ends allowed
BELOW_1 = Bound(0, 1, high_open=True)  # 1 would drop or smooth away everything
INSIDE = Bound(0, 1, low_open=True, high_open=True)

BOUNDS: dict[str, dict[str, Bound]] = {
    "data": {
        "seed": AT_LEAST_0,
        "demo_train_images": AT_LEAST_1,
        "demo_val_images": Bound(2),  # divided into val and test: one image each at least
        "subset": AT_LEAST_1,
        "download_workers": AT_LEAST_1,
        "download_retries": AT_LEAST_0,
    },
    "split": {
        "seed": AT_LEAST_0,
        "val_fraction": INSIDE,  # 0 or 1 would leave val or test empty
        "max_train_images": AT_LEAST_1,
        "max_val_images": AT_LEAST_1,
        "max_test_images": AT_LEAST_1,
    },
    "validate": {
        "max_pixels": AT_LEAST_1,
        "max_quarantine_fraction": FRACTION,
        "min_caption_words": AT_LEAST_1,
        "max_caption_words": AT_LEAST_1,
    },
    "features": {
        "image_size": Bound(75),  # InceptionV3's smallest input side
        "batch_size": AT_LEAST_1,
        "shard_size": AT_LEAST_1,
        "seed": AT_LEAST_0,
    },
    "tokenize": {
        "vocab_size": AT_LEAST_1,
        "max_len": Bound(3),  # <start>, one word, <end>
    },
    "train": {
        **{
            key: AT_LEAST_1
            for key in (
                "embedding_dim",
                "units",
                "attention_units",
                "encoder_dim",
                "transformer_layers",
                "transformer_heads",
                "transformer_width",
                "transformer_ff",
                "batch_size",
                "val_sample_images",
                "smoothing_epochs",
            )
        },  # fmt: skip
        "transformer_dropout": BELOW_1,
        "captions_per_image": AT_LEAST_0,  # 0: every caption per pass
        "budget_pairs": POSITIVE,
        "epoch_pairs": POSITIVE,
        "learning_rate": POSITIVE,
        "lr_min_fraction": FRACTION,
        "clip_norm": AT_LEAST_0,  # 0: off
        "label_smoothing": BELOW_1,
        "attention_penalty": AT_LEAST_0,
        "min_delta": AT_LEAST_0,
        "early_stopping_pairs": AT_LEAST_0,  # 0: never
        "early_stopping_from": FRACTION,
        "seed": AT_LEAST_0,
    },
    "evaluate": {
        "beam_size": AT_LEAST_1,
        "length_penalty": AT_LEAST_0,
        "temperature": POSITIVE,
        "max_len": Bound(2),
        "batch_size": AT_LEAST_1,
    },
    "report": {"num_images": AT_LEAST_1, "seed": AT_LEAST_0},
    "register": {"max_batch": AT_LEAST_1, "max_pixels": AT_LEAST_1},
}

# Mapping-valued keys whose every value has a bound (gates: metric -> number).
VALUE_BOUNDS: dict[str, dict[str, Bound]] = {
    "gates": {"floors": Bound(), "tolerances": AT_LEAST_0},
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bound_problems(section: str, values: Mapping[str, Any]) -> list[str]:
    """What is out of range in one section's (type-checked) values; empty when all is well."""
    problems = []
    for key, bound in BOUNDS.get(section, {}).items():
        value = values.get(key)
        if _number(value) and not bound.allows(value):
            problems.append(f"{section}.{key} = {value!r}: allowed: {bound.describe()}")
    for key, bound in VALUE_BOUNDS.get(section, {}).items():
        mapping = values.get(key)
        for name, value in (mapping or {}).items() if isinstance(mapping, Mapping) else ():
            if _number(value) and not bound.allows(value):
                problems.append(f"{section}.{key}.{name} = {value!r}: allowed: {bound.describe()}")
    problems += _cross_problems(section, values)
    return problems


def _cross_problems(section: str, values: Mapping[str, Any]) -> list[str]:
    if section == "validate":
        low, high = values.get("min_caption_words"), values.get("max_caption_words")
        if _number(low) and _number(high) and low > high:
            return [
                f"validate.max_caption_words = {high!r}: allowed: a number >= "
                f"validate.min_caption_words ({low!r})"
            ]
    if section == "train":
        width, heads = values.get("transformer_width"), values.get("transformer_heads")
        transformer = values.get("decoder") == "transformer"
        if transformer and _number(width) and _number(heads) and heads >= 1 and width % heads:
            return [
                f"train.transformer_width = {width!r}: allowed: a multiple of "
                f"train.transformer_heads ({heads!r})"
            ]
    return []
