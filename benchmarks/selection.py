"""The selection protocol (issue 26): a default changes only where it wins on several data sets.

`python -m benchmarks.selection [--quick] [--images N] [--experiments decoder,decoding,...]`
(`make select` runs the whole protocol).

For every data set (`selection_data.data_sets`: the demo at N and 2N images,
the scenes source at N), every experiment (a few named candidates, each a set
of params.yaml `train`/`evaluate` overrides, the current default first) and
every seed (`train.seed` + 0, 1, 2), the candidate is trained with the train
stage's own `fit_captioner` and scored on the **val** split with the evaluate
stage's own `evaluate_split`; the test split is never read. Candidates that
differ only in decoding share one trained model per seed, and so do
experiments whose candidates train the same settings (the default is trained
once per seed and data set). Every run's checkpoint stays in the cache, so a
killed protocol resumes where it stopped.

Per data set it prints, per candidate, the mean, standard deviation (over
seeds, ddof=1), min and max of val CIDEr and its mean cost in seconds, and a
verdict per challenger: "X beats Y by d > spread" when the means differ by
more than the larger of the two standard deviations, else "tie: keep the
cheaper Z". Across data sets a challenger wins only where it beats the
default beyond the spread on every one of them; otherwise it is a tie and the
cheaper one stays. Everything goes to a JSON (`--out`); `selection()` returns
the same figures for the benchmarks runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.selection_data import Prepared, data_sets, prepare
from captioning.config import EvaluateParams, TrainParams, from_dict, read_params
from captioning.data.sources import source_scorer
from captioning.evaluation.evaluate import evaluate_split, references_by_image
from captioning.features import FeatureStore
from captioning.training.batches import CaptionSet
from captioning.training.fit import fit_captioner

REPO_ROOT = Path(__file__).resolve().parents[1]
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
# --quick: a smoke run of the whole machinery in well under a minute.
QUICK_IMAGES = 16
QUICK_SEEDS = 2
QUICK_EXPERIMENTS = ("decoder", "decoding")
QUICK_TRAIN = {
    "budget_pairs": 32, "epoch_pairs": 32, "batch_size": 16, "val_sample_images": 8,
    "units": 16, "attention_units": 16, "embedding_dim": 16, "encoder_dim": 16,
    "transformer_layers": 1, "transformer_heads": 2, "transformer_width": 16, "transformer_ff": 16,
    "jit_compile": False,  # XLA's compile per model costs more than two steps of a tiny one
}  # fmt: skip
QUICK_EVALUATE = {"max_len": 12, "batch_size": 16}
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
    table = pd.read_parquet(data.table)
    store = FeatureStore(data.features)
    scorer = source_scorer(data.raw)
    trained_file = run_dir / "trained.json"
    start = time.perf_counter()
    model, summary = fit_captioner(
        store, data.vocabulary(), CaptionSet.load(data.tokens, "train"),
        CaptionSet.load(data.tokens, "val"), train, data.extractor_spec(),
        run_dir / "checkpoints", run_dir / "history.csv",
        val_references=references_by_image(table, "val"), val_scorer=scorer,
    )  # fmt: skip
    if not trained_file.is_file():  # a model already trained keeps its first training time
        seconds = round(time.perf_counter() - start, 1)
        trained_file.write_text(json.dumps({"train_seconds": seconds, "summary": summary}))
    trained = json.loads(trained_file.read_text())
    start = time.perf_counter()
    scored = evaluate_split(model, store, table, evaluate, scorer)
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
    train_overrides: dict | None = None,
    evaluate_overrides: dict | None = None,
    params_file: Path = REPO_ROOT / "params.yaml",
) -> dict:
    """Run the protocol; {"data_sets": {name: {experiment: {...}}}, "overall": {...}}."""
    params = read_params(params_file)
    base_train = {**params["train"], **(train_overrides or {})}
    base_evaluate = {**params["evaluate"], **(evaluate_overrides or {}), "split": "val"}
    extractors: dict = {}
    results: dict = {"settings": {"images": images, "seeds": seeds, "metric": f"val {METRIC}",
                                  "train": train_overrides or {}, "evaluate": evaluate_overrides or {}},
                     "data_sets": {}, "overall": {}}  # fmt: skip
    for name, data in data_sets(images, kinds).items():
        prepared = prepare(cache / name, data, params, extractors)
        per_experiment = {}
        for experiment, candidates in experiments.items():
            figures = {}
            for candidate, overrides in candidates.items():
                runs = []
                for offset in range(seeds):
                    train = {**base_train, **overrides.get("train", {})}
                    train["seed"] = int(base_train["seed"]) + offset
                    runs.append(run_candidate(
                        prepared, cache / name / "runs",
                        from_dict(TrainParams, "train", train),
                        from_dict(EvaluateParams, "evaluate",
                                  {**base_evaluate, **overrides.get("evaluate", {})}),
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


def _override(text: str) -> tuple[str, str, object]:
    """`train.key=value` / `evaluate.key=value` -> (section, key, YAML value), as `dvc exp run -S`."""
    dotted, _, value = text.partition("=")
    section, _, key = dotted.partition(".")
    if section not in ("train", "evaluate") or not key:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected train.KEY=VALUE or evaluate.KEY=VALUE"
        )
    return section, key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, 2 seeds")
    parser.add_argument("--images", type=int, default=1000, help="train images N (demo: N and 2N)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--data-sets", default="demo,demo2x,scenes", help="of demo,demo2x,scenes")
    parser.add_argument("--candidates", default="", help="keep only these candidates (comma list)")
    parser.add_argument(
        "-S",
        dest="overrides",
        action="append",
        type=_override,
        default=[],
        help="applied to every candidate, e.g. -S train.budget_pairs=6000",
    )
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / "data" / "selection")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "selection.json")
    args = parser.parse_args()  # fmt: skip
    names = [n for n in args.experiments.split(",") if n]
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    experiments = {n: EXPERIMENTS[n] for n in names}
    train = {k: v for s, k, v in args.overrides if s == "train"}
    evaluate = {k: v for s, k, v in args.overrides if s == "evaluate"}
    images, seeds, keep = args.images, args.seeds, {c for c in args.candidates.split(",") if c}
    if args.quick:
        images, seeds = QUICK_IMAGES, QUICK_SEEDS
        train, evaluate = {**QUICK_TRAIN, **train}, {**QUICK_EVALUATE, **evaluate}
        experiments = {n: EXPERIMENTS[n] for n in QUICK_EXPERIMENTS if n in experiments}
        keep = keep or {c for cs in QUICK_CANDIDATES.values() for c in cs}
    if keep:
        experiments = {
            n: {c: o for c, o in cs.items() if c in keep} for n, cs in experiments.items()
        }
    results = selection(args.cache, images, experiments, seeds, args.data_sets.split(","),
                        train, evaluate)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
