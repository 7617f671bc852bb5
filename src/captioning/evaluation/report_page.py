"""The attention report's page: one static `index.html` of sample sections and galleries.

`render_index` turns the chosen images' `Entry`s (caption, words, attention,
scores, references) and their `Selection` (the seeded sample, the best and
worst by CIDEr) into one HTML string with thumbnails, captions, scores and
references. The page needs no server, network, CSS or JS from elsewhere: its
style and its one script (counting broken images, for headless-browser checks)
are inline, and it links only to the PNG/JPG files written beside it.
"""

from __future__ import annotations

import dataclasses
import html

import numpy as np

from captioning.config import EvaluateParams, ReportParams


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
