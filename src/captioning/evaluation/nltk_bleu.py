"""NLTK's corpus BLEU-1..4, beside coco-caption's BLEU, under keys of their own.

Many published captioning results report NLTK's corpus BLEU rather than
coco-caption's, so `captioning.evaluation.metrics.score` adds it as
`BLEU-1_nltk` .. `BLEU-4_nltk` and a score can be compared with either kind of
paper; `nltk_bleu`'s docstring says how the two differ. A corpus score only:
no per-image values.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from captioning.data.text import clean_caption
from captioning.evaluation.score_inputs import check_inputs

#: The result keys of `nltk_bleu`, BLEU-1 first.
NLTK_KEYS = ("BLEU-1_nltk", "BLEU-2_nltk", "BLEU-3_nltk", "BLEU-4_nltk")
# Cumulative BLEU-n: the geometric mean of the 1..n-gram precisions, equally weighted.
_CUMULATIVE_WEIGHTS = [(1.0,), (1 / 2,) * 2, (1 / 3,) * 3, (1 / 4,) * 4]


def nltk_bleu(
    references: Mapping[int, Sequence[str]], candidates: Mapping[int, str]
) -> dict[str, float]:
    """NLTK's corpus BLEU-1..4 (`nltk.translate.bleu_score.corpus_bleu`, no smoothing).

    Keys `BLEU-1_nltk` .. `BLEU-4_nltk`; only the candidates' images are scored.
    Tokens are `nltk_tokens`: the project's own caption cleaning
    (`captioning.data.text.clean_caption`: lower case, ASCII letters, digits and
    apostrophes) split on spaces, the lower-case, punctuation-free word lists
    that captioning code commonly hands to NLTK. coco-caption's PTB tokenizer
    differs: it splits clitics ("man's" -> "man 's", "don't" -> "do n't"),
    keeps hyphenated words whole ("t-shirt", which cleaning makes "t shirt")
    and non-ASCII letters, and keeps brackets as "-lrb-"/"-rrb-". Both BLEUs
    clip n-gram counts by the most in any one reference and take the reference
    length closest to each candidate (ties to the shorter), summed over the
    corpus, for the brevity penalty exp(1 - r/c) when c < r; coco-caption adds
    1e-15 and 1e-9 to every ratio (so an order with no match gives a tiny score
    instead of 0), and NLTK counts at least one n-gram per candidate in each
    order's denominator, so a candidate shorter than n words lowers NLTK's
    BLEU-n, where coco-caption counts none. Without smoothing an n-gram order
    with no match at all makes BLEU-n and every higher order (almost) 0.
    """
    ids = check_inputs(references, candidates)
    return _nltk_corpus_bleu(
        [[nltk_tokens(r) for r in references[i]] for i in ids],
        [nltk_tokens(candidates[i]) for i in ids],
    )


def nltk_tokens(caption: str) -> list[str]:
    """The words `nltk_bleu` compares: `clean_caption`, split on spaces."""
    return clean_caption(caption).split()


def _nltk_corpus_bleu(
    references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]
) -> dict[str, float]:
    """NLTK corpus BLEU-1..4 of tokenized hypotheses, one list of tokenized references each."""
    # Imported here: NLTK's package import costs about a second, which only this needs.
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        # An order with no match warns; its score (almost 0) is what we report.
        warnings.filterwarnings("ignore", r"\s*The hypothesis contains 0 counts", UserWarning)
        scores = corpus_bleu(references, hypotheses, weights=_CUMULATIVE_WEIGHTS)
    return {key: float(value) for key, value in zip(NLTK_KEYS, scores, strict=True)}
