"""Evaluation: caption a split, score it with coco-caption metrics and the source's own scores.

`evaluate_split` is what the evaluate stage runs: batched decoding through
`captioning.model.decode`, corpus and per-image scores through `captioning.evaluation.metrics`
(coco-caption's, plus NLTK's corpus BLEU under `BLEU-n_nltk` keys), the same
scores for one human reference against the others (how far the model is from
people), and the scores of the data source's own `SourceScorer` when it has
one (`captioning.data.scorers`; on the demo: object accuracy and grounding).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from captioning.config import EvaluateParams
from captioning.data.scorers import SourceScorer
from captioning.evaluation import metrics
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner
from captioning.model.decode import CaptionDecoder, DecodeResult


@dataclasses.dataclass
class Evaluation:
    """One split's captions and scores: what the evaluate stage writes and logs."""

    image_ids: np.ndarray  # (n,) int64, sorted
    decoded: DecodeResult
    corpus: dict[str, float]
    per_image: pd.DataFrame
    skipped: dict[str, str]

    @property
    def predictions(self) -> list[dict]:
        """COCO results format: [{"image_id", "caption"}], sorted by id."""
        return [
            {"image_id": int(i), "caption": c}
            for i, c in zip(self.image_ids, self.decoded.captions, strict=True)
        ]


def references_by_image(table: pd.DataFrame, split: str) -> dict[int, list[str]]:
    """{image_id: [raw reference captions]} for one split of the caption table."""
    rows = table[table["split"] == split]
    return {int(i): list(g["caption"]) for i, g in rows.groupby("image_id", sort=True)}


def decode_images(
    model: Captioner,
    store: FeatureStore,
    image_ids: np.ndarray,
    params: EvaluateParams,
    decoder: CaptionDecoder | None = None,
) -> DecodeResult:
    """Caption images by id with the decoding settings of `params`, in batches."""
    decoder = decoder or CaptionDecoder(model)
    parts = []
    for start in range(0, len(image_ids), params.batch_size):
        features = store.get(image_ids[start : start + params.batch_size])
        parts.append(
            decoder.decode(
                features,
                method=params.decoder,
                max_len=params.max_len,
                beam_size=params.beam_size,
                length_penalty=params.length_penalty,
                temperature=params.temperature,
                batch_size=params.batch_size,
                seed=start,
            )
        )
    return concat_results(parts)


def concat_results(parts: list[DecodeResult]) -> DecodeResult:
    """Join batch results; attention/token arrays are padded to the longest batch."""
    width = max(p.tokens.shape[1] for p in parts)

    def pad(a, value=0):
        extra = [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return np.pad(a, extra, constant_values=value)

    return DecodeResult(
        tokens=np.concatenate([pad(p.tokens) for p in parts]),
        captions=[c for p in parts for c in p.captions],
        scores=np.concatenate([p.scores for p in parts]),
        lengths=np.concatenate([p.lengths for p in parts]),
        attention=np.concatenate([pad(p.attention) for p in parts]),
    )


def evaluate_split(
    model: Captioner,
    store: FeatureStore,
    table: pd.DataFrame,
    params: EvaluateParams,
    scorer: SourceScorer | None = None,
) -> Evaluation:
    """Decode `params.split` and score it with coco-caption's metrics and `scorer`'s."""
    references = references_by_image(table, params.split)
    if not references:
        raise ValueError(f"split {params.split!r} has no images in the caption table")
    image_ids = np.asarray(sorted(references), dtype=np.int64)
    decoded = decode_images(model, store, image_ids, params)
    candidates = dict(zip(image_ids.tolist(), decoded.captions, strict=True))
    scored = metrics.score(references, candidates)

    per_image = _per_image_table(image_ids, decoded, scored, references)
    corpus = dict(scored.corpus)
    if scorer is not None:
        columns, scores = scorer.caption_scores(image_ids.tolist(), decoded.captions)
        for name, values in columns.items():
            per_image[name] = values
        corpus.update(scores)
        attentions = [decoded.attention_for(i) for i in range(len(image_ids))]
        corpus.update(scorer.attention_scores(image_ids.tolist(), decoded.captions, attentions))
    corpus["num_images"] = len(image_ids)
    corpus["mean_words"] = float(decoded.lengths.mean())
    human = metrics.human_agreement(references, metrics=("BLEU", "CIDEr"))
    corpus.update({f"human_{k}": v for k, v in human.items() if k in ("BLEU-4", "CIDEr")})
    return Evaluation(image_ids, decoded, corpus, per_image, dict(scored.skipped))


def _per_image_table(
    image_ids: np.ndarray,
    decoded: DecodeResult,
    scored: metrics.ScoreResult,
    references: dict[int, list[str]],
) -> pd.DataFrame:
    """One row per image: caption, its length and log-probability, scores, reference length."""
    per_image = pd.DataFrame(
        {
            "image_id": image_ids,
            "caption": decoded.captions,
            "words": decoded.lengths,
            "log_prob": decoded.scores,
        }
    )
    for name in ("BLEU-4", "CIDEr"):
        per_image[name] = [scored.per_image[int(i)][name] for i in image_ids]
    per_image["reference_words"] = [
        float(np.mean([len(r.split()) for r in references[int(i)]])) for i in image_ids
    ]
    return per_image


def scores_by_length(per_image: pd.DataFrame, bin_words: int = 4) -> pd.DataFrame:
    """Mean per-image scores by reference caption length (the DVC plot "scores by length").

    Images are binned by the mean word count of their references, in bins of
    `bin_words` words labelled by their lower edge; each row has the bin, the
    number of images and the mean of every score column present.
    """
    if bin_words < 1:
        raise ValueError("bin_words must be at least 1")
    scores = [c for c in ("BLEU-4", "CIDEr", "objects_correct") if c in per_image]
    table = per_image.assign(
        reference_words=(per_image["reference_words"] // bin_words * bin_words).astype(int)
    )
    grouped = table.groupby("reference_words", sort=True)
    out = grouped[scores].mean().astype(float)
    out.insert(0, "images", grouped.size())
    out = out.rename(columns={"objects_correct": "object_accuracy"})
    return out.reset_index()
