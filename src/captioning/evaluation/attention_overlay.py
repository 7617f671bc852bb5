"""Attention overlays: one word's attention grid laid over the image, in the tutorial's style.

`attention_figure` draws one panel per generated word (the image with that
word's attention grid upsampled by `upsample_attention` and laid over it),
`save_png` renders it with Agg and writes a palette PNG with no timestamps (the
same figure gives the same bytes), and `load_rgb` reads the image upright
through `captioning.data.images.decode_image`, as the feature extractor reads
it, so each attention grid lies over the pixels it was computed from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from captioning.data.images import decode_image

GRID_COLUMNS = 5  # overlay panels per row, as in the tutorial
OVERLAY_DPI = 72
TITLE_PX = 20  # band above each panel for its word
PANEL_GAP_PX = 6
ATTENTION_ALPHA = 0.6


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


def load_rgb(path: str | Path, side: int) -> Image.Image:
    """The image as upright RGB, as the feature extractor saw it, shrunk to `side` px on its longest edge."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: source image for the attention report not found")
    image = Image.fromarray(decode_image(path))  # (h, w, 3) uint8, EXIF orientation applied
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image
