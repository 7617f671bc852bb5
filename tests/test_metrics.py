"""Tests for captioning.evaluation.metrics: parity with the official coco-caption scores,
exact agreement with pycocoevalcap's own tokenizer and scorers, NLTK's corpus
BLEU against a from-scratch BLEU and against coco-caption's, metric sanity,
SPICE reported as skipped when its jars are missing, the Java processes being
ended, and the errors for malformed inputs and files. They run the real Java
tokenizer and scorers; the parity test, which runs all of them (METEOR's JVM
included) on 1000 images, is marked slow.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioning.data.text import clean_caption
from captioning.evaluation.coco_files import load_references, load_results
from captioning.evaluation.coco_java import MeteorProcess, ptb_tokenize, spice_unavailable_reason
from captioning.evaluation.metrics import (
    CORPUS_KEYS,
    NLTK_BLEU,
    format_table,
    human_agreement,
    score,
    score_files,
)
from captioning.evaluation.nltk_bleu import NLTK_KEYS, _nltk_corpus_bleu

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "coco_val2014_sample"
needs_sample = pytest.mark.skipif(
    not (SAMPLE / "captions_val2014_sample.json").is_file(),
    reason=f"COCO val2014 sample not found at {SAMPLE} (the shared/ folder beside the repo)",
)

# Scores of fakecap_results.json from the official coco-caption code (SAMPLE/README.md).
OFFICIAL = {
    "BLEU-1": 0.5794,
    "BLEU-2": 0.4044,
    "BLEU-3": 0.2785,
    "BLEU-4": 0.1908,
    "METEOR": 0.1953,
    "ROUGE-L": 0.3963,
    "CIDEr": 0.5998,
}

# METEOR's JVM takes ~8 s to load its paraphrase table, so fast tests leave it out.
NO_METEOR = ("BLEU", "ROUGE_L", "CIDEr")

REFERENCES = {
    1: [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.",
        "Surfer catching a wave on a sunny day.",
    ],
    2: [
        "Two dogs playing with a frisbee in a park.",
        "A pair of dogs chase a frisbee on the grass.",
        "Dogs running across a grassy field after a frisbee.",
    ],
    3: [
        "A plate of food with broccoli and rice.",
        "A dinner plate holds rice, chicken and broccoli.",
        "Broccoli and rice served on a white plate.",
    ],
    4: [
        "A red double decker bus on a city street.",
        "A double decker bus driving down the road.",
        "A large red bus parked next to a sidewalk.",
    ],
}


def _java_children() -> list[int]:
    """Pids of java processes (zombies included) whose parent is this test process."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process ended while we looked
        name = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 1 :].split()[1])
        if ppid == os.getpid() and name == "java":
            pids.append(int(stat.parent.name))
    return pids


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
@needs_sample
def test_score_files_reproduces_official_coco_caption_scores():
    before = _java_children()
    start = time.perf_counter()
    result = score_files(SAMPLE / "fakecap_results.json", SAMPLE / "captions_val2014_sample.json")
    elapsed = time.perf_counter() - start
    print(f"parity scoring of 1000 images took {elapsed:.1f} s")

    for key, official in OFFICIAL.items():
        got = result.corpus[key]
        assert round(got, 3) == round(official, 3) or abs(got - official) < 5e-4, (key, got)
    assert len(result.per_image) == 1000
    assert all(set(OFFICIAL) <= set(s) for s in result.per_image.values())
    if spice_unavailable_reason() is not None:
        assert "SPICE" in result.skipped and "SPICE" not in result.corpus
    assert _java_children() == before, "the METEOR or tokenizer JVM was left running"


@needs_sample
def test_tokenizer_and_scorers_match_pycocoevalcap_exactly():
    # The same steps as COCOEvalCap.evaluate, with pycocoevalcap's own tokenizer
    # (METEOR aside: its JVM is slow to start and the parity test covers it).
    references = load_references(SAMPLE / "captions_val2014_sample.json")
    candidates = load_results(SAMPLE / "fakecap_results.json")
    ids = sorted(candidates)[:200]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": candidates[i]}] for i in ids})
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_per_image = Rouge().compute_score(gts, res)
    cider, cider_per_image = Cider().compute_score(gts, res)

    ours = score(references, {i: candidates[i] for i in ids}, NO_METEOR)

    assert ours.corpus["BLEU-4"] == pytest.approx(bleu[3], abs=1e-12)
    assert ours.corpus["ROUGE-L"] == pytest.approx(rouge, abs=1e-12)
    assert ours.corpus["CIDEr"] == pytest.approx(cider, abs=1e-12)
    for k, i in enumerate(gts):  # pycocoevalcap's per-image lists follow gts order
        assert ours.per_image[i]["BLEU-4"] == pytest.approx(bleu_per_image[3][k], abs=1e-12)
        assert ours.per_image[i]["ROUGE-L"] == pytest.approx(rouge_per_image[k], abs=1e-12)
        assert ours.per_image[i]["CIDEr"] == pytest.approx(cider_per_image[k], abs=1e-12)


def _bleu_from_scratch(
    references: list[list[list[str]]], hypotheses: list[list[str]]
) -> list[float]:
    """Corpus BLEU-1..4 as Papineni et al. (2002) define it, written out independently of NLTK.

    Each order's precision sums, over the corpus, hypothesis n-grams clipped by
    their largest count in any one reference, over all hypothesis n-grams; the
    brevity penalty compares the total hypothesis length c with the summed
    reference lengths r closest to each hypothesis (ties to the shorter).
    """
    matched, proposed = [0] * 4, [0] * 4
    hypothesis_words = reference_words = 0
    for refs, hyp in zip(references, hypotheses, strict=True):
        for n in range(1, 5):
            grams = Counter(tuple(hyp[k : k + n]) for k in range(len(hyp) - n + 1))
            most = Counter()
            for ref in refs:
                most |= Counter(tuple(ref[k : k + n]) for k in range(len(ref) - n + 1))
            matched[n - 1] += sum(min(count, most[gram]) for gram, count in grams.items())
            proposed[n - 1] += sum(grams.values())
        hypothesis_words += len(hyp)
        reference_words += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    c, r = hypothesis_words, reference_words
    penalty = 1.0 if c >= r else math.exp(1 - r / c)
    precisions = [m / p for m, p in zip(matched, proposed, strict=True)]
    return [penalty * math.exp(sum(map(math.log, precisions[:n])) / n) for n in range(1, 5)]


@needs_sample
def test_nltk_bleu_on_coco_is_a_textbook_bleu_a_hair_from_coco_caption():
    references = load_references(SAMPLE / "captions_val2014_sample.json")
    candidates = load_results(SAMPLE / "fakecap_results.json")
    ids = sorted(candidates)
    result = score(references, candidates, ("BLEU", NLTK_BLEU))

    # NLTK's BLEU on clean_caption words is the textbook corpus BLEU of those words.
    words = [[clean_caption(r).split() for r in references[i]] for i in ids]
    hypotheses = [clean_caption(candidates[i]).split() for i in ids]
    # No candidate is shorter than 4 words, so NLTK's at-least-one-n-gram
    # denominator (see nltk_bleu) plays no part here.
    assert min(map(len, hypotheses)) >= 4
    expected = _bleu_from_scratch(words, hypotheses)
    for n, key in enumerate(NLTK_KEYS, start=1):
        assert result.corpus[key] == pytest.approx(expected[n - 1], abs=1e-12), key
        # Only the tokenisation differs from coco-caption's BLEU: a few 1e-4 here.
        gap = result.corpus[key] - result.corpus[f"BLEU-{n}"]
        assert 1e-5 < abs(gap) < 1e-3, (key, gap)
    assert set(result.per_image[ids[0]]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}

    # On coco-caption's own PTB tokens the two BLEUs agree (up to its 1e-9 guards).
    ptb = iter(ptb_tokenize([r for i in ids for r in references[i]]))
    ptb_refs = [[next(ptb).split() for _ in references[i]] for i in ids]
    ptb_hyps = [c.split() for c in ptb_tokenize([candidates[i] for i in ids])]
    on_ptb = _nltk_corpus_bleu(ptb_refs, ptb_hyps)
    for n, key in enumerate(NLTK_KEYS, start=1):
        assert on_ptb[key] == pytest.approx(result.corpus[f"BLEU-{n}"], abs=1e-9), key


def test_nltk_bleu_counts_short_candidates_in_every_order():
    # coco-caption counts no 3-gram for a 2-word candidate; NLTK counts one (documented).
    gts = {
        1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave"],
        2: ["two dogs playing with a frisbee", "dogs chase a frisbee"],
    }
    res = {1: ["a man riding a large wave"], 2: ["two dogs"]}
    coco, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = _nltk_corpus_bleu(
        [[r.split() for r in gts[i]] for i in gts], [res[i][0].split() for i in gts]
    )

    assert ours["BLEU-1_nltk"] == pytest.approx(coco[0], abs=1e-9)
    assert ours["BLEU-2_nltk"] == pytest.approx(coco[1], abs=1e-9)
    assert ours["BLEU-3_nltk"] < coco[2] - 1e-3
    assert ours["BLEU-4_nltk"] < coco[3] - 1e-3


def test_nltk_bleu_without_matches_is_zero_and_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NLTK's zero-count warning must not escape
        result = score(REFERENCES, {2: "a cat", 3: "zebra"}, (NLTK_BLEU,))
    assert set(result.corpus) == set(NLTK_KEYS)
    assert 0 < result.corpus["BLEU-1_nltk"] < 1
    assert result.corpus["BLEU-2_nltk"] == pytest.approx(0, abs=1e-12)
    assert result.per_image == {2: {}, 3: {}}
    nothing = score(REFERENCES, {3: "zebra"}, (NLTK_BLEU,))
    assert nothing.corpus == dict.fromkeys(NLTK_KEYS, 0.0)


def test_tokenizer_lower_cases_strips_punctuation_and_keeps_lines_aligned():
    captions = ['A man\rrides a "big" wave.', "", "Two dogs, (maybe) three!", "Café\u2028time"]
    # "-lrb-"/"-rrb-" survive: coco-caption's punctuation list has "-LRB-", but
    # the tokenizer has already lower-cased it. Kept, as the official scores do.
    assert ptb_tokenize(captions) == [
        "a man rides a big wave",
        "",
        "two dogs -lrb- maybe -rrb- three",
        "café time",
    ]


def test_perfect_candidate_beats_an_unrelated_one():
    perfect = {i: refs[0] for i, refs in REFERENCES.items()}
    # Each image gets another image's caption: fluent, but about something else.
    shuffled = {i: REFERENCES[i % 4 + 1][0] for i in REFERENCES}
    good = score(REFERENCES, perfect, NO_METEOR)
    bad = score(REFERENCES, shuffled, NO_METEOR)

    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert good.corpus[key] > bad.corpus[key], key
        for i in REFERENCES:
            assert good.per_image[i][key] > bad.per_image[i][key], (key, i)
    assert good.corpus["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_per_image_keys_and_only_candidate_images_are_scored():
    candidates = {1: "a surfer riding a wave", 3: "a plate with broccoli"}
    result = score(REFERENCES, candidates, NO_METEOR)

    assert set(result.per_image) == {1, 3}
    expected = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert set(result.corpus) == expected
    assert all(set(s) == expected for s in result.per_image.values())
    assert result.skipped == {}
    # References of images without a candidate play no part (not even in CIDEr's
    # document frequencies), as in coco-caption.
    only_scored = score({i: REFERENCES[i] for i in (1, 3)}, candidates, NO_METEOR)
    assert only_scored.corpus == result.corpus
    # The order the dicts were built in does not matter.
    reordered = score(REFERENCES, dict(reversed(candidates.items())), NO_METEOR)
    assert reordered == result


def test_spice_is_reported_as_skipped_not_zero():
    reason = spice_unavailable_reason()
    if reason is None:
        pytest.skip("SPICE's Stanford CoreNLP jars are installed here, so SPICE really runs")
    result = score(REFERENCES, {1: "a surfer on a wave"}, ("BLEU", "SPICE"))

    assert result.skipped == {"SPICE": reason}
    assert "stanford-corenlp-3.6.0" in reason
    assert "SPICE" not in result.corpus
    assert "SPICE" not in result.per_image[1]
    assert "BLEU-4" in result.corpus


def test_meteor_process_ends_even_when_scoring_fails():
    before = _java_children()
    with pytest.raises(KeyError), MeteorProcess() as meteor:
        meteor.compute_score({1: ["a dog"]}, {})  # no candidate for image 1
    assert _java_children() == before


def test_errors_for_bad_score_inputs():
    with pytest.raises(ValueError, match=r"no reference captions: 7, 9"):
        score(REFERENCES, {1: "a surfer", 7: "x", 9: "y"}, NO_METEOR)
    with pytest.raises(ValueError, match="no candidate"):
        score(REFERENCES, {}, NO_METEOR)
    with pytest.raises(ValueError, match="unknown metrics"):
        score(REFERENCES, {1: "a surfer"}, ("BLEU", "WER"))
    with pytest.raises(ValueError, match="no reference captions: 5"):
        score({5: []}, {5: "a cat"}, NO_METEOR)
    with pytest.raises(TypeError, match="image 1"):
        score(REFERENCES, {1: None}, NO_METEOR)


def test_load_results_and_references_round_trip(tmp_path):
    results = _write(
        tmp_path / "res.json",
        [{"image_id": 2, "caption": "dogs"}, {"image_id": 1, "caption": "a surfer"}],
    )
    annotations = _write(
        tmp_path / "ann.json",
        {
            "images": [],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": "A surfer."},
                {"image_id": 2, "id": 11, "caption": "Two dogs."},
                {"image_id": 1, "id": 12, "caption": "A wave."},
            ],
        },
    )
    assert load_results(results) == {2: "dogs", 1: "a surfer"}
    assert load_references(annotations) == {1: ["A surfer.", "A wave."], 2: ["Two dogs."]}
    assert set(score_files(results, annotations, NO_METEOR).per_image) == {1, 2}


def test_load_results_errors(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{'image_id': 1}")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(bad_json)
    with pytest.raises(ValueError, match="JSON list"):
        load_results(_write(tmp_path / "obj.json", {"image_id": 1, "caption": "x"}))
    with pytest.raises(ValueError, match='"caption" must be a string'):
        load_results(_write(tmp_path / "nocap.json", [{"image_id": 1}]))
    with pytest.raises(ValueError, match='"image_id" must be an integer'):
        load_results(_write(tmp_path / "strid.json", [{"image_id": "1", "caption": "x"}]))
    with pytest.raises(ValueError, match="more than one caption.*: 1, 3"):
        load_results(
            _write(
                tmp_path / "dup.json",
                [
                    {"image_id": 1, "caption": "a"},
                    {"image_id": 1, "caption": "b"},
                    {"image_id": 2, "caption": "c"},
                    {"image_id": 3, "caption": "d"},
                    {"image_id": 3, "caption": "e"},
                ],
            )
        )
    with pytest.raises(ValueError, match="empty"):
        load_results(_write(tmp_path / "empty.json", []))


def test_load_references_errors(tmp_path):
    with pytest.raises(ValueError, match='"annotations" list'):
        load_references(_write(tmp_path / "list.json", [{"image_id": 1, "caption": "x"}]))
    with pytest.raises(ValueError, match="annotation 1"):
        load_references(
            _write(
                tmp_path / "bad.json",
                {"annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": 3}]},
            )
        )


def test_score_files_rejects_results_for_unknown_images(tmp_path):
    results = _write(tmp_path / "res.json", [{"image_id": 99, "caption": "a cat"}])
    annotations = _write(
        tmp_path / "ann.json", {"annotations": [{"image_id": 1, "caption": "A surfer."}]}
    )
    with pytest.raises(ValueError, match="no reference captions: 99"):
        score_files(results, annotations, NO_METEOR)


@needs_sample
def test_human_agreement_on_coco_is_sensible():
    references = load_references(SAMPLE / "captions_val2014_sample.json")
    human = human_agreement(references, NO_METEOR)

    assert set(human) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert all(0 < v < 1 for v in human.values()), human
    # Published COCO human agreement is roughly BLEU-4 0.2 and CIDEr 0.85-0.9.
    assert 0.1 < human["BLEU-4"] < 0.3
    assert 0.5 < human["CIDEr"] < 1


def test_human_agreement_leaves_out_single_reference_images():
    references = {**REFERENCES, 5: ["A lone caption."]}
    assert human_agreement(references, NO_METEOR) == human_agreement(REFERENCES, NO_METEOR)
    with pytest.raises(ValueError, match="at least two references"):
        human_agreement({5: ["A lone caption."]}, NO_METEOR)


def test_format_table_orders_metrics_and_rounds():
    table = format_table(
        {"BLEU-4_nltk": 0.19092, "CIDEr": 0.59979, "extra": 1.0, "BLEU-4": 0.19083}
    )
    assert table.splitlines() == [
        "| metric | score |",
        "|---|---|",
        "| BLEU-4 | 0.1908 |",
        "| CIDEr | 0.5998 |",
        "| BLEU-4_nltk | 0.1909 |",
        "| extra | 1.0000 |",
    ]
    assert list(CORPUS_KEYS)[:4] == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
