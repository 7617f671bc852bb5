"""The selection protocol (issue 26): a default changes only where it wins on several data sets.

`python -m benchmarks selection [--images N] [--experiments decoder,...]` (`make
select`). For every data set (`selection_data.data_sets`: the demo at N and 2N
images, the scenes source at N), every experiment (named candidates, each a set
of params.yaml `train`/`evaluate` overrides, the default first) and every seed
(`train.seed` + 0, 1, 2), the candidate is trained with the train stage's
`fit_captioner` and scored on the **val** split with `evaluate_split`; the test
split is never read. Runs that train the same settings share one model, and
every run is cached, so a killed protocol resumes. A challenger beats the
default on a data set when the means of val CIDEr differ by more than the
larger seed standard deviation, else it is a tie and the cheaper stays; it
becomes the default only where it wins on every data set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import pandas as pd

from benchmarks.harness import Result
from benchmarks.selection_data import Prepared, data_sets, prepare, train_model
from benchmarks.workspace import PARAMS_FILE, REPO_ROOT, SMOKE_PARAMS, TINY_TRAIN, merged_params
from captioning.config import EvaluateParams, TrainParams, from_dict, read_params
from captioning.data.sources import source_scorer
from captioning.evaluation.evaluate import evaluate_split
from captioning.features import FeatureStore

METRIC = "CIDEr"
KEPT = ("CIDEr", "BLEU-4", "METEOR", "object_accuracy", "grounding", "mean_words")

# experiment -> {candidate: {"train": overrides, "evaluate": overrides}}; the default first.
EXPERIMENTS: dict[str, dict[str, dict]] = {
    "decoder": {
        "gru": {"train": {"decoder": "gru"}},
        "transformer": {"train": {"decoder": "transformer"}},
        "transformer-lr5e-4": {"train": {"decoder": "transformer", "learning_rate": 5e-4}},
    },
    "decoding": {
        "greedy": {"evaluate": {"decoder": "greedy"}},
        "beam3": {"evaluate": {"decoder": "beam", "beam_size": 3, "length_penalty": 1.0}},
        "beam3-lp0.5": {"evaluate": {"decoder": "beam", "beam_size": 3, "length_penalty": 0.5}},
        "beam5": {"evaluate": {"decoder": "beam", "beam_size": 5, "length_penalty": 1.0}},
    },
    "label_smoothing": {
        "ls0.1": {"train": {"label_smoothing": 0.1}},
        "ls0": {"train": {"label_smoothing": 0.0}},
    },
    "budget": {
        "budget60k": {"train": {"budget_pairs": 60000}},
        "budget30k": {"train": {"budget_pairs": 30000}},
    },
}
# --quick: the whole machinery on tiny data; --smoke: less of it, at 75 px.
QUICK_TRAIN = {
    **TINY_TRAIN, "budget_pairs": 32, "epoch_pairs": 32, "batch_size": 16, "val_sample_images": 8,
}  # fmt: skip
QUICK = {"train": QUICK_TRAIN, "evaluate": {"max_len": 12, "batch_size": 16}}
SMOKE = {**SMOKE_PARAMS, "data": {}}
QUICK_CANDIDATES = {"decoder": ("gru", "transformer"), "decoding": ("greedy", "beam3")}


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def run_candidate(
    data: Prepared, folder: Path, train: TrainParams, evaluate: EvaluateParams
) -> dict:
    """Train (or reuse) one model and score it on val; the figures, cached in `folder`."""
    run_dir = folder / f"train-{_key(dataclasses.asdict(train))}"
    result_file = run_dir / f"val-{_key(dataclasses.asdict(evaluate))}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    trained_file = run_dir / "trained.json"
    start = time.perf_counter()
    model, summary = train_model(data, train, run_dir)
    if not trained_file.is_file():  # a model already trained keeps its first training time
        seconds = round(time.perf_counter() - start, 1)
        trained_file.write_text(json.dumps({"train_seconds": seconds, "summary": summary}))
    trained = json.loads(trained_file.read_text())
    start = time.perf_counter()
    table, store = pd.read_parquet(data.table), FeatureStore(data.features)
    scored = evaluate_split(model, store, table, evaluate, source_scorer(data.raw))
    figures = {
        **{k: round(float(scored.corpus[k]), 4) for k in KEPT if k in scored.corpus},
        "seed": train.seed,
        "model": run_dir.name,
        "train_seconds": trained["train_seconds"],
        "decode_seconds": round(time.perf_counter() - start, 1),
        "best_epoch": trained["summary"].get("best_epoch"),
    }
    result_file.write_text(json.dumps(figures, indent=1))
    return figures


def spread_figures(runs: list[dict]) -> dict:
    """Mean, std (ddof=1), min and max of the metric over seeds, and the mean cost."""
    values = [r[METRIC] for r in runs]
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "seconds": round(statistics.fmean(r["train_seconds"] + r["decode_seconds"] for r in runs)),
        "decode_seconds": round(statistics.fmean(r["decode_seconds"] for r in runs), 1),
        "models": sorted({r["model"] for r in runs}),
        "runs": runs,
    }


def verdict(default: str, challenger: str, figures: dict[str, dict]) -> dict:
    """One comparison on one data set: who wins beyond the spread, or the cheaper on a tie."""
    a, b = figures[challenger], figures[default]
    d = round(a["mean"] - b["mean"], 4)
    spread = max(a["std"], b["std"])
    if abs(d) > spread:
        winner, loser = (challenger, default) if d > 0 else (default, challenger)
        text = f"{winner} beats {loser} by {abs(d):.3f} > spread {spread:.3f}"
        return {"winner": winner, "beyond_spread": True, "d": d, "spread": spread, "text": text}
    # Candidates sharing their trained models differ in decoding cost alone.
    cost = "decode_seconds" if a["models"] == b["models"] else "seconds"
    cheaper = challenger if a[cost] < b[cost] else default
    text = f"tie ({challenger} - {default} = {d:+.3f}, spread {spread:.3f}): keep the cheaper {cheaper}"
    return {"winner": cheaper, "beyond_spread": False, "d": d, "spread": spread, "text": text}


def overall(default: str, challenger: str, per_set: list[dict], seconds: dict[str, float]) -> str:
    """Across data sets: a challenger wins only beyond the spread, the same way, on all of them."""
    if per_set and all(v["beyond_spread"] and v["winner"] == challenger for v in per_set):
        return f"{challenger} beats {default} on all {len(per_set)} data sets: make it the default"
    if per_set and all(v["beyond_spread"] and v["winner"] == default for v in per_set):
        return f"{default} beats {challenger} on all {len(per_set)} data sets: keep {default}"
    cheaper = min((default, challenger), key=lambda name: seconds[name])
    return f"tie across {len(per_set)} data sets: keep the cheaper {cheaper}"


def selection(
    cache: Path,
    images: int,
    experiments: dict[str, dict[str, dict]],
    seeds: int,
    kinds: list[str],
    changes: dict[str, dict] | None = None,
    params_file: Path = REPO_ROOT / PARAMS_FILE,
) -> dict:
    """Run the protocol; {"data_sets": {name: {experiment: {...}}}, "overall": {...}}.

    `changes`: params.yaml sections' overrides for every candidate (train, evaluate, features).
    """
    changes = changes or {}
    params = merged_params(read_params(params_file), changes)
    base_train, base_evaluate = params["train"], {**params["evaluate"], "split": "val"}
    extractors: dict = {}
    settings = {"images": images, "seeds": seeds, "metric": f"val {METRIC}", **changes}
    results: dict = {"settings": settings, "data_sets": {}, "overall": {}}
    for name, data in data_sets(images, kinds).items():
        prepared = prepare(cache / name, data, params, extractors)
        per_experiment = {}
        for experiment, candidates in experiments.items():
            figures = {}
            for candidate, overrides in candidates.items():
                evaluate = {**base_evaluate, **overrides.get("evaluate", {})}
                runs = []
                for offset in range(seeds):
                    train = {**base_train, **overrides.get("train", {})}
                    train["seed"] = int(base_train["seed"]) + offset
                    runs.append(run_candidate(
                        prepared, cache / name / "runs", from_dict(TrainParams, "train", train),
                        from_dict(EvaluateParams, "evaluate", evaluate),
                    ))  # fmt: skip
                figures[candidate] = spread_figures(runs)
            default = next(iter(candidates))
            verdicts = {c: verdict(default, c, figures) for c in candidates if c != default}
            per_experiment[experiment] = {"candidates": figures, "verdicts": verdicts}
            print_table(name, experiment, per_experiment[experiment])
        results["data_sets"][name] = per_experiment
    for experiment, candidates in experiments.items():
        default = next(iter(candidates))
        per_set = [r[experiment] for r in results["data_sets"].values()]
        shared = all(
            len({str(f["models"]) for f in r["candidates"].values()}) == 1 for r in per_set
        )
        cost = "decode_seconds" if shared else "seconds"
        seconds = {c: sum(r["candidates"][c][cost] for r in per_set) for c in candidates}
        results["overall"][experiment] = {
            c: overall(default, c, [r["verdicts"][c] for r in per_set], seconds)
            for c in candidates if c != default
        }  # fmt: skip
        for text in results["overall"][experiment].values():
            print(f"overall {experiment}: {text}")
    return results


def print_table(data_set: str, experiment: str, result: dict) -> None:
    """Mean and spread of val CIDEr per candidate, then one verdict line per challenger."""
    print(f"\n{data_set} / {experiment}: val {METRIC} over seeds")
    print(f"  {'candidate':<20}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}{'seconds':>9}")
    for candidate, f in result["candidates"].items():
        print(f"  {candidate:<20}{f['mean']:>8.3f}{f['std']:>8.3f}{f['min']:>8.3f}"
              f"{f['max']:>8.3f}{f['seconds']:>9}")  # fmt: skip
    for v in result["verdicts"].values():
        print(f"  verdict: {v['text']}")


def chosen_experiments(names: list[str], keep: set[str]) -> dict[str, dict[str, dict]]:
    """EXPERIMENTS by name, with only the `keep` candidates when it is not empty."""
    if unknown := sorted(set(names) - set(EXPERIMENTS)):
        raise SystemExit(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    chosen = {n: EXPERIMENTS[n] for n in names}
    return {n: {c: o for c, o in cs.items() if not keep or c in keep} for n, cs in chosen.items()}


def bench_selection(ws) -> Result:
    o = ws.options
    names, keep = o.experiments or list(EXPERIMENTS), set(o.candidates)
    images, seeds, kinds, changes = o.images, o.repeats, o.data_sets, {}
    if ws.quick:  # 16 images, 2 seeds, decoder and decoding; --smoke: 8 demo images, decoding
        images, seeds, changes = (8, 2, SMOKE) if ws.smoke else (16, 2, QUICK)
        names = ["decoding"] if ws.smoke else list(QUICK_CANDIDATES)
        kinds = ["demo"] if ws.smoke else kinds
        keep = keep or {c for cs in QUICK_CANDIDATES.values() for c in cs}
    for section, key, value in o.overrides:
        changes = merged_params(changes, {section: {key: value}})
    cache = o.cache or (ws.root / "selection" if ws.quick else REPO_ROOT / "data" / "selection")
    results = selection(cache, images, chosen_experiments(names, keep), seeds, kinds, changes)
    out = o.results or ws.default_results("selection")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    result = Result(f"selection: val {METRIC} over {seeds} seeds, {images} images, {kinds}")
    for data_set, per_experiment in results["data_sets"].items():
        for experiment, figures in per_experiment.items():
            for candidate, f in figures["candidates"].items():
                cells = {k: f[k] for k in ("mean", "std", "min", "max", "seconds")}
                result.add_row({"run": f"{data_set} {experiment} {candidate}", **cells})
    for experiment, texts in results["overall"].items():
        result.notes += [f"overall {experiment}: {text}" for text in texts.values()]
    result.notes.append(f"every run's figures in {out}; runs cached in {cache}")
    return result
