"""Caption metrics: the official COCO caption evaluation (coco-caption), and NLTK's corpus BLEU.

`score` does what `COCOEvalCap.evaluate()` does, step by step and offline: both
sides go through the same Java PTB tokenizer (references and candidates
tokenized in separate calls, `coco_java`), and the tokenized text goes to
pycocoevalcap's BLEU(4), ROUGE-L and CIDEr scorers, with CIDEr's document
frequencies taken from the references of the images being evaluated; METEOR and
SPICE run in `coco_java`, SPICE only when its CoreNLP jars are installed
(otherwise it is reported in `skipped`, never as zero). Beside them it adds
`nltk_bleu`'s NLTK corpus BLEU-1..4 under keys of their own (`BLEU-4_nltk`).
Only the images that have a candidate are scored, as coco-caption scores the
images in its results file. `score_files` scores COCO JSON files (`coco_files`),
`human_agreement` scores one human caption per image against the others, and
`format_table` renders a Markdown table.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from captioning.evaluation.coco_files import load_references, load_results
from captioning.evaluation.coco_java import (
    MeteorProcess,
    ptb_tokenize,
    run_spice,
    spice_unavailable_reason,
)
from captioning.evaluation.nltk_bleu import NLTK_KEYS, nltk_bleu
from captioning.evaluation.score_inputs import check_inputs

#: What `COCOEvalCap.evaluate()` computes.
COCO_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
#: NLTK's corpus BLEU-1..4 (`nltk_bleu`): a corpus score only, no per-image values.
NLTK_BLEU = "BLEU_nltk"
#: Every metric `score` knows; `score_files` asks for all of them.
ALL_METRICS = (*COCO_METRICS, NLTK_BLEU)
#: What `score` computes unless told otherwise: all but SPICE, which needs CoreNLP.
DEFAULT_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", NLTK_BLEU)
#: Result keys in display order.
CORPUS_KEYS = (
    *("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"),
    *NLTK_KEYS,
)


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Corpus scores, per-image scores and the metrics that could not be computed."""

    corpus: dict[str, float]
    per_image: dict[int, dict[str, float]]
    skipped: dict[str, str]


def score(
    references: Mapping[int, Sequence[str]],
    candidates: Mapping[int, str],
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> ScoreResult:
    """Score one candidate caption per image against that image's references.

    Only the candidates' images are scored; references of other images are
    ignored, including for CIDEr's document frequencies (as in coco-caption).
    """
    wanted = _check_metrics(metrics)
    ids = check_inputs(references, candidates)
    with contextlib.ExitStack() as stack:
        # METEOR's JVM spends seconds loading its paraphrase table; start it
        # first so that it loads while the tokenizer and other scorers run.
        meteor = stack.enter_context(MeteorProcess()) if "METEOR" in wanted else None
        # Two tokenizer runs, references then candidates, as coco-caption does.
        tokenized = iter(ptb_tokenize([r for i in ids for r in references[i]]))
        gts = {i: [next(tokenized) for _ in references[i]] for i in ids}
        res = {i: [c] for i, c in zip(ids, ptb_tokenize([candidates[i] for i in ids]), strict=True)}

        corpus: dict[str, float] = {}
        per_image: dict[int, dict[str, float]] = {i: {} for i in ids}
        skipped: dict[str, str] = {}

        def record(key: str, total: float, scores: Sequence[float]) -> None:
            corpus[key] = float(total)
            for i, s in zip(ids, scores, strict=True):
                per_image[i][key] = float(s)

        if "BLEU" in wanted:
            totals, per_n = Bleu(4).compute_score(gts, res, verbose=0)
            for n, (total, scores) in enumerate(zip(totals, per_n, strict=True), start=1):
                record(f"BLEU-{n}", total, scores)
        if "ROUGE_L" in wanted:
            record("ROUGE-L", *Rouge().compute_score(gts, res))
        if "CIDEr" in wanted:
            record("CIDEr", *Cider().compute_score(gts, res))
        if meteor is not None:
            record("METEOR", *meteor.compute_score(gts, res))
        if NLTK_BLEU in wanted:
            corpus.update(nltk_bleu(references, candidates))
    if "SPICE" in wanted:
        reason = spice_unavailable_reason() or run_spice(gts, res, record)
        if reason is not None:
            skipped["SPICE"] = reason
    return ScoreResult(
        corpus={k: corpus[k] for k in CORPUS_KEYS if k in corpus},
        per_image={i: {k: s[k] for k in CORPUS_KEYS if k in s} for i, s in per_image.items()},
        skipped=skipped,
    )


def score_files(
    results_path: str | Path,
    annotations_path: str | Path,
    metrics: Iterable[str] = ALL_METRICS,
) -> ScoreResult:
    """Score a COCO results file against a COCO captions file, like coco-caption's demo (+ NLTK BLEU)."""
    return score(load_references(annotations_path), load_results(results_path), metrics)


def human_agreement(
    references: Mapping[int, Sequence[str]],
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Score each image's first reference against its other references (leave-one-out).

    Images with fewer than two references are left out. Caveat: the human is
    judged against one reference fewer (4 instead of 5 on COCO) than a model
    scored with `score`, and BLEU/CIDEr rise with more references, so this
    understates human agreement next to model scores; for a like-for-like
    comparison, score the model against the same `refs[1:]`.
    """
    held_in = {i: list(refs[1:]) for i, refs in references.items() if len(refs) >= 2}
    if not held_in:
        raise ValueError("human agreement needs images with at least two references")
    held_out = {i: references[i][0] for i in held_in}
    return score(held_in, held_out, metrics).corpus


def format_table(corpus: Mapping[str, float]) -> str:
    """Render corpus scores as a two-column Markdown table in the usual metric order."""
    known = [k for k in CORPUS_KEYS if k in corpus]
    keys = known + [k for k in corpus if k not in CORPUS_KEYS]
    rows = ["| metric | score |", "|---|---|"]
    rows += [f"| {k} | {corpus[k]:.4f} |" for k in keys]
    return "\n".join(rows) + "\n"


def _check_metrics(metrics: Iterable[str]) -> set[str]:
    wanted = set(metrics)
    unknown = wanted - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(ALL_METRICS)}")
    if not wanted:
        raise ValueError("no metrics requested")
    return wanted
