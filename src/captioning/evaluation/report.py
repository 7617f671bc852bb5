"""Attention report: per-word attention overlays and a static HTML page of examples.

`build_report` picks a seeded sample of evaluation images plus the best and
worst by CIDEr, decodes them with the evaluate stage's settings through the
shared `captioning.evaluation.evaluate.decode_images` (in the very batches evaluate used,
so the captions shown are the ones scored), draws one figure per image in the
tutorial's style (one panel per generated word: the image with that word's
attention grid upsampled and laid over it), and writes `index.html` with
thumbnails, captions, scores and references. Images are read upright through
`captioning.data.images.decode_image`, as the feature extractor reads them, so each
attention grid lies over the pixels it was computed from. The page needs no
server, network, CSS or JS from elsewhere: it links only to the PNG/JPG files
written beside it. Outputs are byte-for-byte reproducible: no timestamps,
seeded choices, PNGs rendered with Agg and quantised by Pillow. The folder is
replaced as a whole when the report is complete (it is one DVC output).
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from captioning.atomic_files import atomic_directory
from captioning.config import EvaluateParams, ReportParams
from captioning.data.images import decode_image
from captioning.data.text import END, END_ID
from captioning.evaluation.evaluate import decode_images, references_by_image
from captioning.features import FeatureStore
from captioning.model.captioner import Captioner
from captioning.model.decode import CaptionDecoder

EXTREMES = 10  # images in each of the "best" and "worst" galleries
GRID_COLUMNS = 5  # overlay panels per row, as in the tutorial
OVERLAY_DPI = 72
OVERLAY_SIDE = 160  # longest side (px) of each panel's image
TITLE_PX = 20  # band above each panel for its word
PANEL_GAP_PX = 6
THUMBNAIL_SIDE = 320  # longest side (px) of the JPEG copy the page shows
ATTENTION_ALPHA = 0.6


@dataclasses.dataclass(frozen=True)
class Selection:
    """Image ids for the report: the seeded sample and the CIDEr extremes."""

    sample: list[int]
    best: list[int]
    worst: list[int]

    @property
    def all_ids(self) -> list[int]:
        return sorted(set(self.sample) | set(self.best) | set(self.worst))


@dataclasses.dataclass(frozen=True)
class Entry:
    """What the page shows for one image."""

    image_id: int
    caption: str
    words: list[str]  # one per attention map: the caption's tokens, then <end> if emitted
    attention: np.ndarray  # (len(words), L)
    cider: float
    bleu4: float
    references: list[str]


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


# ----------------------------------------------------------------------------- drawing


def upsample_attention(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One word's weights (L,) as a square sqrt(L) grid, bicubic-upsampled to (h, w) in [0, 1].

    Each map is divided by its own peak, as the tutorial's per-panel colour
    scaling does, so a word's focus shows even when its weights are spread.
    """
    side = math.isqrt(len(weights))
    if side * side != len(weights):
        raise ValueError(f"{len(weights)} attention weights do not form a square grid")
    grid = np.asarray(weights, np.float32).reshape(side, side)  # (g, g), row-major like the CNN
    peak = float(grid.max())
    grid = grid / peak if peak > 0 else grid
    width, height = size[1], size[0]
    resized = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)  # mode F
    return np.clip(np.asarray(resized), 0.0, 1.0)  # (h, w); bicubic overshoots a little


def attention_figure(image: np.ndarray, words: Sequence[str], attention: np.ndarray) -> Figure:
    """Tutorial-style grid: one panel per word, the image under its upsampled attention map.

    image (h, w, 3) uint8, attention (len(words), L). Up to GRID_COLUMNS panels a
    row, the word as each panel's title (`fig.texts`, one per panel). Panels are
    pixel-exact `figimage`s rather than Axes: Axes build tick machinery that
    costs far more than drawing, and a report draws hundreds of panels.
    """
    if len(words) != len(attention):
        raise ValueError(f"{len(words)} words but {len(attention)} attention maps")
    height, width = image.shape[:2]
    titles = list(words) or ["(no words)"]
    columns = min(GRID_COLUMNS, len(titles))
    rows = math.ceil(len(titles) / columns)
    cell_w, cell_h = width + PANEL_GAP_PX, height + TITLE_PX + PANEL_GAP_PX
    fig = Figure(
        figsize=(columns * cell_w / OVERLAY_DPI, rows * cell_h / OVERLAY_DPI),
        dpi=OVERLAY_DPI,
        facecolor="white",
    )
    for k, title in enumerate(titles):
        row, column = divmod(k, columns)
        x0 = column * cell_w + PANEL_GAP_PX // 2  # pixels from the left
        y0 = (rows - 1 - row) * cell_h + PANEL_GAP_PX // 2  # pixels from the bottom
        fig.figimage(image, xo=x0, yo=y0, origin="upper")
        if words:
            fig.figimage(
                upsample_attention(attention[k], (height, width)),  # (h, w)
                xo=x0,
                yo=y0,
                origin="upper",
                cmap="gray",
                vmin=0.0,
                vmax=1.0,
                alpha=ATTENTION_ALPHA,
            )
        fig.text(
            (x0 + width / 2) / (columns * cell_w),
            (y0 + height + TITLE_PX / 2) / (rows * cell_h),
            title,
            ha="center",
            va="center",
            fontsize=11,
            parse_math=False,  # words are text, never mathtext
        )
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Render with Agg (no pyplot, no global backend) and save a 256-colour PNG.

    Pillow writes no timestamps, so the same figure gives the same bytes; the
    palette keeps photo-filled grids a fraction of their RGB size.
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # (H, W, 3) uint8
    Image.fromarray(rgb).quantize(256, method=Image.Quantize.MEDIANCUT).save(
        path, format="PNG", optimize=True
    )


def _load_rgb(path: str | Path, side: int) -> Image.Image:
    """The image as upright RGB, as the feature extractor saw it, shrunk to `side` px on its longest edge."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: source image for the attention report not found")
    image = Image.fromarray(decode_image(path))  # (h, w, 3) uint8, EXIF orientation applied
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


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


# ----------------------------------------------------------------------------- page


_CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 72em; color: #222; }
h1, h2 { border-bottom: 1px solid #ccc; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em; }
section.image { margin: 1.5em 0; padding-bottom: 1em; border-bottom: 1px dashed #ddd; }
.row { display: flex; gap: 1.5em; align-items: flex-start; }
.caption { font-size: 1.15em; }
.score { color: #555; font-family: monospace; }
ul.refs { color: #444; margin: 0.3em 0; }
img.overlay { max-width: 100%; display: block; margin-top: 0.5em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(15em, 1fr)); gap: 1em; }
.card { border: 1px solid #ddd; padding: 0.5em; }
.card img { width: 100%; }
"""

# Counts images that failed to load, for headless-browser checks of the page.
_SCRIPT = """
window.addEventListener("load", function () {
  var broken = 0;
  for (var i = 0; i < document.images.length; i++) {
    if (!document.images[i].complete || document.images[i].naturalWidth === 0) broken++;
  }
  document.body.dataset.broken = String(broken);
});
"""


def _score(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _references(entry: Entry) -> str:
    items = "".join(f"<li>{html.escape(r)}</li>" for r in entry.references)
    return f'<ul class="refs">{items}</ul>'


def _scores(entry: Entry) -> str:
    return (
        f'<span class="score">CIDEr {_score(entry.cider)} &middot; '
        f"BLEU-4 {_score(entry.bleu4)}</span>"
    )


def _sample_section(entry: Entry) -> str:
    i = entry.image_id
    return (
        f'<section class="image" id="image-{i}">\n<h3>Image {i}</h3>\n<div class="row">'
        f'<img src="images/{i}.jpg" alt="image {i}">\n<div>'
        f'<p class="caption">{html.escape(entry.caption) or "<em>(empty)</em>"}</p>\n'
        f"<p>{_scores(entry)}</p>\n<p>References:</p>\n{_references(entry)}</div></div>\n"
        f'<a href="overlays/{i}.png"><img class="overlay" src="overlays/{i}.png" '
        f'alt="attention for image {i}"></a>\n</section>'
    )


def _card(entry: Entry) -> str:
    i = entry.image_id
    return (
        f'<div class="card"><a href="overlays/{i}.png"><img src="images/{i}.jpg" '
        f'alt="image {i}"></a>\n<p class="caption">{html.escape(entry.caption)}</p>\n'
        f"<p>{_scores(entry)} &middot; image {i} &middot; "
        f'<a href="overlays/{i}.png">attention</a></p>\n{_references(entry)}</div>'
    )


# What an overlay shows, by `train.decoder`.
ATTENTION_SOURCE = {
    "gru": "the attention the GRU used for that word",
    "transformer": "the last block's cross-attention for that word, averaged over its heads",
}


def render_index(
    entries: dict[int, Entry],
    selection: Selection,
    report: ReportParams,
    evaluate: EvaluateParams,
    decoder: str = "gru",
    training_warning: str | None = None,
) -> str:
    """The whole page as one string: sample sections, then best and worst galleries.

    `training_warning` (the train stage's still-improving warning) is shown
    above everything else.
    """
    settings = html.escape(
        f"split={evaluate.split}, decoder={evaluate.decoder}, beam_size={evaluate.beam_size}, "
        f"length_penalty={evaluate.length_penalty}, "
        f"temperature={evaluate.temperature}, max_len={evaluate.max_len}; "
        f"sample of {len(selection.sample)} drawn with seed {report.seed}"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">\n<head>\n<meta charset="utf-8">',
        "<title>Attention report</title>",
        f"<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n</head>\n<body>",
        "<h1>Attention report</h1>",
        *(
            [
                f'<p class="warning"><strong>Training warning:</strong> {html.escape(training_warning)}</p>'
            ]
            if training_warning
            else []
        ),
        f"<p>{settings}. Each overlay panel is one generated word: "
        f"{ATTENTION_SOURCE.get(decoder, 'its attention')}; brighter = more attention.</p>",
        '<p><a href="#sample">Sample</a> &middot; <a href="#best">Best by CIDEr</a> '
        '&middot; <a href="#worst">Worst by CIDEr</a></p>',
        f'<h2 id="sample">Sample ({len(selection.sample)} images)</h2>',
        *(_sample_section(entries[i]) for i in selection.sample),
    ]
    for anchor, title, ids in (
        ("best", "best", selection.best),
        ("worst", "worst", selection.worst),
    ):
        parts.append(f'<h2 id="{anchor}">{len(ids)} {title} by CIDEr</h2>')
        parts.append('<div class="gallery">')
        parts.extend(_card(entries[i]) for i in ids)
        parts.append("</div>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


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
    _load_rgb(source, THUMBNAIL_SIDE).save(out / "images" / f"{image_id}.jpg", quality=85)
    under = np.asarray(_load_rgb(source, OVERLAY_SIDE))  # (h, w, 3) uint8
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
