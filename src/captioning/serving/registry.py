"""Model registry: register a run's served model and decide whether it becomes the champion.

`register_captioner` turns a logged pyfunc model into a version of the
registered model (`image-captioner` by default) and moves the `champion` alias
to it only when its test CIDEr beats the current champion's on the same
evaluation set, and never when the run is not eligible (`blocking_reason`:
its params fail the check, or its metrics are below the `gates:` floors);
otherwise the version gets the `challenger` alias and a tag
saying why. "The same evaluation set" is a digest of the evaluated image ids
and their reference captions (`evaluation_set_digest`), stored as a tag on
every version, because CIDEr depends on the references (and their document
frequencies) as much as on the model. Registering the same run's model with
the same serving settings twice is a no-op that returns the existing version.
The functions take an `MlflowClient` and touch nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captioning.config import GatesParams
from captioning.evaluation.gate import compare, summary

CHAMPION = "champion"
CHALLENGER = "challenger"
# Model version tags: what the decision was based on, readable in the MLflow UI.
TAG_EVAL_SET = "eval_set_digest"
TAG_METRIC = "selection_metric"
TAG_SCORE = "selection_score"
TAG_ROLE = "registered_as"
TAG_REASON = "decision_reason"
TAG_MODEL_KEY = "model_key"


@dataclasses.dataclass(frozen=True)
class Decision:
    alias: str  # CHAMPION or CHALLENGER
    reason: str


@dataclasses.dataclass(frozen=True)
class Registration:
    """What `reports/registered.json` records."""

    name: str
    version: str
    alias: str
    reason: str
    run_id: str
    model_uri: str
    metric: str
    score: float
    eval_set_digest: str
    previous_champion: str | None
    metrics: dict[str, float]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


def evaluation_set_digest(table: pd.DataFrame, split: str, image_ids: Iterable[int]) -> str:
    """sha256 over the evaluated images' ids and their sorted reference captions."""
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise ValueError("no evaluated images: cannot identify the evaluation set")
    rows = table[(table["split"] == split) & table["image_id"].isin(ids)]
    references = {int(i): sorted(g["caption"].astype(str)) for i, g in rows.groupby("image_id")}
    missing = [i for i in ids if i not in references]
    if missing:
        raise ValueError(f"evaluated images not in split {split!r} of the table: {missing[:10]}")
    content = {"split": split, "images": [[i, references[i]] for i in ids]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def decide(
    score: float,
    eval_set: str,
    champion_tags: Mapping[str, str] | None,
    metric: str = "CIDEr",
    champion_version: str | None = None,
) -> Decision:
    """Champion only when `score` strictly beats the champion's on the same evaluation set."""
    if not math.isfinite(score):
        return Decision(CHALLENGER, f"{metric} is {score}, not a number that can be compared")
    if champion_tags is None:
        return Decision(CHAMPION, f"first version with a {metric} score: no champion yet")
    label = f"champion (version {champion_version})" if champion_version else "champion"
    their_set = champion_tags.get(TAG_EVAL_SET)
    if their_set != eval_set:
        return Decision(
            CHALLENGER,
            f"not comparable: evaluated on a different set ({eval_set[:12]}) than the "
            f"{label} ({(their_set or 'unknown')[:12]}); re-evaluate both on one set, or move "
            f"the alias by hand",
        )
    if champion_tags.get(TAG_METRIC) != metric:
        return Decision(
            CHALLENGER,
            f"not comparable: the {label} was selected on "
            f"{champion_tags.get(TAG_METRIC)!r}, not {metric!r}",
        )
    theirs = float(champion_tags.get(TAG_SCORE, "nan"))
    if score > theirs:
        return Decision(CHAMPION, f"{metric} {score:.4f} beats the {label}'s {theirs:.4f}")
    return Decision(CHALLENGER, f"{metric} {score:.4f} does not beat the {label}'s {theirs:.4f}")


def blocking_reason(
    config_problems: Sequence[str],
    metrics: Mapping[str, Any] | None = None,
    gates: GatesParams | None = None,
) -> str | None:
    """Why a run may not become champion whatever its score, or None when it may.

    `config_problems` are `captioning.config.check_params`'s lines for the
    run's params; `metrics` (metrics.json) must meet the `gates:` floors. The
    tolerances need a base run, which registration has not: `captioning gate`
    checks those.
    """
    if config_problems:
        more = f" (and {len(config_problems) - 1} more)" if len(config_problems) > 1 else ""
        return f"not eligible for champion: invalid params: {config_problems[0]}{more}"
    if metrics is not None and gates is not None and gates.floors:
        result = compare(metrics, None, dataclasses.replace(gates, tolerances={}))
        if not result.passed:
            return f"not eligible for champion: {summary(result)}"
    return None


def current_champion(client: MlflowClient, name: str):
    """The version holding the champion alias, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                description="Image captioner: a base64 image in (JPEG, PNG, WebP, ...), caption out",
            )
        except MlflowException as err:  # created meanwhile by a concurrent register
            if "already exists" not in str(err).lower():
                raise


def _existing_version(client: MlflowClient, name: str, run_id: str, model_key: str):
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.tags.get(TAG_MODEL_KEY) == model_key:
            return version
    return None


def _aliases_of(client: MlflowClient, name: str, version: str) -> list[str]:
    return list(client.get_model_version(name, version).aliases)


def register_captioner(
    client: MlflowClient,
    name: str,
    run_id: str,
    metrics: Mapping[str, float],
    eval_set: str,
    model_key: str,
    log_model: Callable[[], tuple[str, str | None]],
    metric: str = "CIDEr",
    blocked: str | None = None,
) -> Registration:
    """Register the run's model as a version of `name` and set its alias (champion or challenger).

    `metrics` are the test metrics (`metrics[metric]` decides), `eval_set` the
    `evaluation_set_digest` they were measured on, `model_key` identifies the
    exact model file and serving settings. `log_model()` logs the model and
    returns (model_uri, model_id); it is called only when this run has no
    version with this key yet, so a rerun logs and registers nothing new.
    `blocked` (from `blocking_reason`) makes it a challenger whatever its score.
    """
    if metric not in metrics:
        raise KeyError(f"metric {metric!r} not in the evaluation metrics {sorted(metrics)}")
    score = float(metrics[metric])
    clean_metrics = {k: float(v) for k, v in metrics.items() if _is_number(v)}
    _ensure_registered_model(client, name)
    champion = current_champion(client, name)

    existing = _existing_version(client, name, run_id, model_key)
    if existing is not None:
        aliases = _aliases_of(client, name, existing.version)
        alias = CHAMPION if CHAMPION in aliases else existing.tags.get(TAG_ROLE, CHALLENGER)
        return Registration(
            name=name,
            version=str(existing.version),
            alias=alias,
            reason=f"already registered as version {existing.version}: "
            + existing.tags.get(TAG_REASON, ""),
            run_id=run_id,
            model_uri=existing.source,
            metric=metric,
            score=score,
            eval_set_digest=eval_set,
            previous_champion=str(champion.version) if champion else None,
            metrics=clean_metrics,
        )

    model_uri, model_id = log_model()
    decision = (
        Decision(CHALLENGER, blocked)
        if blocked
        else decide(
            score,
            eval_set,
            champion.tags if champion else None,
            metric,
            str(champion.version) if champion else None,
        )
    )
    version = client.create_model_version(
        name=name,
        source=model_uri,
        run_id=run_id,
        model_id=model_id,
        tags={
            TAG_EVAL_SET: eval_set,
            TAG_METRIC: metric,
            TAG_SCORE: repr(score),
            TAG_MODEL_KEY: model_key,
            TAG_ROLE: decision.alias,
            TAG_REASON: decision.reason,
            **{f"metric.{k}": repr(v) for k, v in sorted(clean_metrics.items())},
        },
        description=decision.reason,
    )
    client.set_registered_model_alias(name, decision.alias, version.version)
    return Registration(
        name=name,
        version=str(version.version),
        alias=decision.alias,
        reason=decision.reason,
        run_id=run_id,
        model_uri=model_uri,
        metric=metric,
        score=score,
        eval_set_digest=eval_set,
        previous_champion=str(champion.version) if champion else None,
        metrics=clean_metrics,
    )


def model_key(model_path: str | Path, serving_config: Mapping[str, Any]) -> str:
    """Identity of a served model: the .keras file's sha256 plus the serving settings."""
    with open(model_path, "rb") as fh:
        file_digest = hashlib.file_digest(fh, "sha256").hexdigest()
    content = {"model": file_digest, "serving": dict(serving_config)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
