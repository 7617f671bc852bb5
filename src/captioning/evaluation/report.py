"""Attention report: per-word attention overlays and a static HTML page of examples.

`build_report` picks a seeded sample of evaluation images plus the best and
worst by CIDEr, decodes them with the evaluate stage's settings through the
shared `captioning.evaluation.evaluate.decode_images` (in the very batches
evaluate used, so the captions shown are the ones scored), draws one figure per
image in the tutorial's style (`attention_overlay`: one panel per generated
word, the image with that word's attention grid laid over it), and writes
`index.html` with thumbnails, captions, scores and references (`report_page`).
Outputs are byte-for-byte reproducible: no timestamps, seeded choices, PNGs
rendered with Agg and quantised by Pillow. The folder is replaced as a whole
when the report is complete (it is one DVC output).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from captioning.atomic_files import atomic_directory
from captioning.config import EvaluateParams, ReportParams
from captioning.data.text import END, END_ID
from captioning.evaluation.attention_overlay import attention_figure, load_rgb, save_png
from captioning.evaluation.evaluate import decode_images, references_by_image
from captioning.evaluation.report_page import Entry, Selection, render_index
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner
from captioning.model.decode import CaptionDecoder

EXTREMES = 10  # images in each of the "best" and "worst" galleries
OVERLAY_SIDE = 160  # longest side (px) of each panel's image
THUMBNAIL_SIDE = 320  # longest side (px) of the JPEG copy the page shows


def select_images(
    per_image: pd.DataFrame,
    split_ids: Sequence[int],
    num_images: int,
    seed: int,
    extremes: int = EXTREMES,
) -> Selection:
    """A seeded sample of `split_ids` and the best/worst `extremes` images by CIDEr.

    Ties in CIDEr go to the lower image id. With fewer than 2 * extremes scored
    images the two galleries split them (best gets the odd one) instead of
    showing the same images twice.
    """
    ids = np.sort(np.asarray(split_ids, dtype=np.int64))  # sorted, so the draw ignores input order
    count = min(max(num_images, 0), len(ids))
    sample = np.sort(np.random.default_rng(seed).choice(ids, size=count, replace=False))
    scored = per_image[per_image["image_id"].isin(ids)]
    ranked = scored.sort_values(["CIDEr", "image_id"], ascending=[False, True], kind="stable")
    ranked_ids = ranked["image_id"].astype("int64").tolist()
    n_best = min(extremes, math.ceil(len(ranked_ids) / 2))
    n_worst = min(extremes, len(ranked_ids) // 2)
    lowest_first = scored.sort_values(["CIDEr", "image_id"], kind="stable")["image_id"]
    return Selection(
        sample=[int(i) for i in sample],
        best=[int(i) for i in ranked_ids[:n_best]],
        worst=[int(i) for i in lowest_first.astype("int64").tolist()[:n_worst]],
    )


# ----------------------------------------------------------------------------- decoding


def _decode_like_evaluate(
    model: Captioner,
    store: FeatureStore,
    split_ids: np.ndarray,
    wanted: Iterable[int],
    params: EvaluateParams,
) -> dict[int, tuple[str, list[str], np.ndarray]]:
    """{image_id: (caption, words, attention (words, L))} decoded as the evaluate stage did.

    Evaluate decodes the sorted split in batches of `params.batch_size`; redoing
    exactly those batches gives the same numbers, so the same captions. Sampling
    also seeds each batch by its offset in the ids passed, so for it decoding
    must start at the split's first image.
    """
    position = {int(i): p for p, i in enumerate(split_ids)}
    size = params.batch_size
    batches = sorted({position[int(i)] // size for i in wanted})
    if not batches:
        return {}
    if params.decoder == "sample":
        spans = [(0, (batches[-1] + 1) * size)]
    else:
        spans = [(b * size, (b + 1) * size) for b in batches]
    decoder = CaptionDecoder(model)
    words_of = model.vocabulary.words
    wanted = set(int(i) for i in wanted)
    found = {}
    for start, stop in spans:
        ids = split_ids[start:stop]
        result = decode_images(model, store, ids, params, decoder)
        for row, image_id in enumerate(ids.tolist()):
            if image_id not in wanted:
                continue
            n = int(result.lengths[row])
            tokens = result.tokens[row]  # (T,)
            # The <end> step has a map of its own; the tutorial shows it too.
            shown = n + int(n < len(tokens) and tokens[n] == END_ID)
            words = [words_of[t] for t in tokens[:n]] + [END] * (shown - n)
            found[image_id] = (result.captions[row], words, result.attention[row, :shown])
    return found


# ----------------------------------------------------------------------------- entry point


def _entries(
    image_ids: Sequence[int],
    decoded: dict[int, tuple[str, list[str], np.ndarray]],
    per_image: pd.DataFrame,
    references: dict[int, list[str]],
) -> tuple[dict[int, Entry], list[int]]:
    """What the page shows per image, and the images whose caption differs from `per_image`'s."""
    scores = per_image.drop_duplicates("image_id").set_index("image_id")
    entries: dict[int, Entry] = {}
    mismatches = []
    for image_id in image_ids:
        caption, words, attention = decoded[image_id]
        row = scores.loc[image_id] if image_id in scores.index else None
        if row is not None and "caption" in row.index and _scored_caption(row) != caption:
            mismatches.append(image_id)
        entries[image_id] = Entry(
            image_id=image_id,
            caption=caption,
            words=words,
            attention=attention,
            cider=float(row["CIDEr"]) if row is not None else float("nan"),
            bleu4=float(row["BLEU-4"]) if row is not None else float("nan"),
            references=references[image_id],
        )
    return entries, mismatches


def _draw_image(source: str | Path, entry: Entry, out: Path) -> None:
    """Write `out/images/<id>.jpg` (the page's thumbnail) and `out/overlays/<id>.png`."""
    image_id = entry.image_id
    load_rgb(source, THUMBNAIL_SIDE).save(out / "images" / f"{image_id}.jpg", quality=85)
    under = np.asarray(load_rgb(source, OVERLAY_SIDE))  # (h, w, 3) uint8
    figure = attention_figure(under, entry.words, entry.attention)
    save_png(figure, out / "overlays" / f"{image_id}.png")


def _scored_caption(row: pd.Series) -> str:
    # CSV readers turn an empty caption into NaN; it still means "".
    return "" if pd.isna(row["caption"]) else str(row["caption"])


def build_report(
    model: Captioner,
    store: FeatureStore,
    table: pd.DataFrame,
    per_image: pd.DataFrame,
    report_params: ReportParams,
    evaluate_params: EvaluateParams,
    out_dir: str | Path,
    training_warning: str | None = None,
) -> dict:
    """Write `out_dir/{index.html, overlays/<id>.png, images/<id>.jpg}`; returns a summary.

    `out_dir` is replaced as a whole once everything is written: nothing else
    belongs in it.

    `table` is the caption table (image_id, path, split, caption); `per_image`
    the evaluate stage's scores (image_id, caption, BLEU-4, CIDEr). The
    summary's `caption_mismatches` lists images whose decoded caption differs
    from `per_image` (it should be empty when both used the same settings).
    """
    split = evaluate_params.split
    references = references_by_image(table, split)
    if not references:
        raise ValueError(f"split {split!r} has no images in the caption table")
    split_ids = np.asarray(sorted(references), dtype=np.int64)  # evaluate's order
    selection = select_images(per_image, split_ids, report_params.num_images, report_params.seed)
    decoded = _decode_like_evaluate(model, store, split_ids, selection.all_ids, evaluate_params)

    entries, mismatches = _entries(selection.all_ids, decoded, per_image, references)
    paths = table.drop_duplicates("image_id").set_index("image_id")["path"]
    out = Path(out_dir)
    with atomic_directory(out) as staged:
        for folder in ("overlays", "images"):
            (staged / folder).mkdir()
        for image_id, entry in entries.items():
            _draw_image(paths[image_id], entry, staged)
        page = render_index(
            entries, selection, report_params, evaluate_params, model.model_config.decoder,
            training_warning,
        )  # fmt: skip
        (staged / "index.html").write_text(page, "utf-8")
    index = out / "index.html"
    return {
        "index": str(index),
        "sample": selection.sample,
        "best": selection.best,
        "worst": selection.worst,
        "overlays": len(entries),
        "captions": {i: e.caption for i, e in entries.items()},
        "caption_mismatches": mismatches,
    }
