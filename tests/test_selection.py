"""The selection protocol (`benchmarks.selection`) end to end on tiny data: real training, real scoring.

Two data sets (the demo and the scenes source, 8 train images each), two
seeds, the decoding experiment (greedy vs beam 3 share one trained model per
seed) at --quick's sizes: every figure comes from `fit_captioner` and
`evaluate_split` on the val split, and a rerun reads the cache instead of
training again.
"""

from __future__ import annotations

import json

import pytest
from benchmarks import selection


def test_verdicts_follow_the_spread():
    def figs(mean, std, seconds, models):
        return {"mean": mean, "std": std, "seconds": seconds, "decode_seconds": seconds / 10,
                "models": models}  # fmt: skip

    won = selection.verdict(
        "a", "b", {"a": figs(1.0, 0.1, 5, ["m"]), "b": figs(1.5, 0.2, 9, ["n"])}
    )
    assert won["beyond_spread"] and won["winner"] == "b" and won["text"].startswith("b beats a")
    tie = selection.verdict(
        "a", "b", {"a": figs(1.0, 0.3, 9, ["m"]), "b": figs(1.2, 0.1, 5, ["n"])}
    )
    assert not tie["beyond_spread"] and tie["winner"] == "b" and "keep the cheaper b" in tie["text"]
    per_set = [won, dict(won, winner="b"), tie]
    assert "tie across 3" in selection.overall("a", "b", per_set, {"a": 1, "b": 2})
    assert "keep the cheaper a" in selection.overall("a", "b", per_set, {"a": 1, "b": 2})
    assert "make it the default" in selection.overall("a", "b", [won, won, won], {"a": 1, "b": 2})


@pytest.mark.slow
def test_quick_protocol_trains_scores_val_and_resumes(tmp_path, capsys):
    experiments = {
        "decoding": {n: selection.EXPERIMENTS["decoding"][n] for n in ("greedy", "beam3")}
    }
    run = dict(
        cache=tmp_path / "cache", images=8, experiments=experiments, seeds=2,
        kinds=["demo", "scenes"], train_overrides=selection.QUICK_TRAIN,
        evaluate_overrides=selection.QUICK_EVALUATE,
    )  # fmt: skip
    results = selection.selection(**run)
    assert set(results["data_sets"]) == {"demo-8", "scenes-8"}
    for per_experiment in results["data_sets"].values():
        figures = per_experiment["decoding"]["candidates"]
        assert figures["greedy"]["models"] == figures["beam3"]["models"]  # one model per seed
        assert len(figures["greedy"]["models"]) == 2
        for f in figures.values():
            values = [r["CIDEr"] for r in f["runs"]]
            assert [r["seed"] for r in f["runs"]] == [42, 43]
            assert f["min"] == min(values) and f["max"] == max(values)
            assert f["mean"] == pytest.approx(sum(values) / 2, abs=1e-4)
        assert "object_accuracy" in figures["greedy"]["runs"][0]
        verdict = per_experiment["decoding"]["verdicts"]["beam3"]["text"]
        assert "beats" in verdict or "tie" in verdict
    assert "overall decoding:" in capsys.readouterr().out
    cached = sorted((tmp_path / "cache").rglob("val-*.json"))
    assert len(cached) == 2 * 2 * 2  # data sets x seeds x decoders
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert json.loads(json.dumps(selection.selection(**run))) == results
    assert [p.stat().st_mtime_ns for p in cached] == stamps
