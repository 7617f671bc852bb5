"""Tests for captioning.evaluation.report: image choice, overlays, and the static HTML page.

Real components throughout: a tiny untrained `Captioner`, a feature store
written with `write_shard` and read by `FeatureStore`, small JPEGs
made with Pillow. The page is checked by parsing its links, and (slow) by
loading it in headless Chromium and counting images that failed to load.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from captioning.config import EvaluateParams, ReportParams
from captioning.data.text import END_ID, SPECIAL_TOKENS, Vocabulary
from captioning.evaluation.attention_overlay import (
    PANEL_GAP_PX,
    TITLE_PX,
    attention_figure,
    upsample_attention,
)
from captioning.evaluation.evaluate import decode_images
from captioning.evaluation.report import OVERLAY_SIDE, build_report, select_images
from captioning.features import SHARD_SUFFIX, FeatureStore, write_shard
from captioning.model.captioner import build_captioner

WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right"]
TEST_IDS = list(range(101, 123))  # 22 images: enough for full best/worst galleries
TRAIN_IDS = [7, 9]
SCRIPT_CAPTION = '<script>alert("x")</script> a red square & "friends"'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _write_image(path: Path, image_id: int) -> None:
    rng = np.random.default_rng(image_id)
    size = (64 + 8 * (image_id % 3), 48 + 8 * (image_id % 2))  # a few shapes and aspects
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(0, 32, 2))
    draw.rectangle([x, y, x + 24, y + 16], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image.save(path, format="JPEG", quality=90)


def _write_store(root: Path, ids_by_split: dict[str, list[int]]) -> FeatureStore:
    """One shard per split, <split>-00000.shard (n, 64, 2048) float16, and index.parquet."""
    root.mkdir(parents=True)
    rows = []
    for split, ids in sorted(ids_by_split.items()):
        rng = np.random.default_rng(len(rows))
        features = rng.normal(size=(len(ids), 64, 2048)).astype(np.float16)  # (n, L, C)
        shard = f"{split}-00000{SHARD_SUFFIX}"
        write_shard(root / shard, features)
        rows += [(i, split, shard, r) for r, i in enumerate(ids)]
    index = pd.DataFrame(rows, columns=["image_id", "split", "shard", "row"])
    index.to_parquet(root / "index.parquet", index=False)
    return FeatureStore(root)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_captioner):
    """Model, store, caption table and evaluate-style per-image scores for 22 test images."""
    root = tmp_path_factory.mktemp("report_world")
    (root / "raw").mkdir()
    table_rows = []
    for image_id in TRAIN_IDS + TEST_IDS:
        path = root / "raw" / f"{image_id}.jpg"
        _write_image(path, image_id)
        split = "train" if image_id in TRAIN_IDS else "test"
        for k in range(2):
            caption = f"a {WORDS[(image_id + k) % len(WORDS)]} square on the left"
            table_rows.append((image_id, str(path), split, caption))
    table = pd.DataFrame(table_rows, columns=["image_id", "path", "split", "caption"])
    table.loc[table["image_id"] == TEST_IDS[3], "caption"] = SCRIPT_CAPTION
    store = _write_store(root / "features", {"train": TRAIN_IDS, "test": TEST_IDS})

    vocabulary = Vocabulary(list(SPECIAL_TOKENS) + WORDS)
    model = tiny_captioner(
        vocabulary, (64, 2048), embedding_dim=16, units=32, attention_units=16, encoder_dim=16
    )
    # batch_size 8 over 22 images: the report must redo evaluate's partial batches too.
    evaluate = EvaluateParams(split="test", max_len=7, batch_size=8)

    ids = np.asarray(TEST_IDS, dtype=np.int64)
    decoded = decode_images(model, store, ids, evaluate)  # what the evaluate stage scores
    cider = np.round(np.random.default_rng(1).uniform(0, 2, len(ids)), 1)  # (n,) with ties
    cider[3] = 9.0  # the image with the <script> reference is the best
    per_image = pd.DataFrame(
        {
            "image_id": ids,
            "caption": decoded.captions,
            "words": decoded.lengths,
            "BLEU-4": cider / 10,
            "CIDEr": cider,
        }
    )
    return {
        "model": model,
        "store": store,
        "table": table,
        "per_image": per_image,
        "evaluate": evaluate,
        "report": ReportParams(num_images=3, seed=0),
        "root": root,
    }


def _build(world, out: Path, per_image: pd.DataFrame | None = None) -> dict:
    return build_report(
        world["model"],
        world["store"],
        world["table"],
        world["per_image"] if per_image is None else per_image,
        world["report"],
        world["evaluate"],
        out,
    )


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "attention"
    return out, _build(world, out)


class _Links(HTMLParser):
    """Collects src/href values and the tags seen."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]


def _parse(html_text: str) -> _Links:
    parser = _Links()
    parser.feed(html_text)
    return parser


# ----------------------------------------------------------------------------- pure parts


def test_select_images_is_seeded_and_ranks_by_cider_with_id_ties():
    per_image = pd.DataFrame(
        {"image_id": [5, 3, 9, 1, 7, 2], "CIDEr": [1.0, 2.0, 2.0, 0.5, 0.5, 0.1]}
    )
    split_ids = [9, 7, 5, 3, 2, 1, 4]  # 4 is in the split but unscored
    first = select_images(per_image, split_ids, num_images=3, seed=0, extremes=2)
    again = select_images(per_image, list(reversed(split_ids)), num_images=3, seed=0, extremes=2)
    assert first == again
    assert first.sample == sorted(first.sample) and set(first.sample) <= set(split_ids)
    assert len(first.sample) == 3
    assert first.best == [3, 9]  # 2.0 tie: lower id first
    assert first.worst == [2, 1]  # 0.5 tie between 1 and 7: lower id first
    other = select_images(per_image, split_ids, num_images=3, seed=1, extremes=2)
    assert other.best == first.best and other.worst == first.worst
    assert select_images(per_image, split_ids, num_images=50, seed=0).sample == sorted(split_ids)


def test_select_images_splits_few_images_between_galleries():
    per_image = pd.DataFrame({"image_id": [1, 2, 3, 4, 5], "CIDEr": [5.0, 4.0, 3.0, 2.0, 1.0]})
    selection = select_images(per_image, [1, 2, 3, 4, 5], num_images=2, seed=0)
    assert selection.best == [1, 2, 3] and selection.worst == [5, 4]


def test_upsample_attention_keeps_the_grid_layout():
    weights = np.zeros(64, np.float32)
    weights[7] = 0.5  # row 0, column 7 of the 8x8 grid: top right
    up = upsample_attention(weights, (40, 80))  # (h, w)
    assert up.shape == (40, 80) and up.min() >= 0.0 and up.max() <= 1.0
    assert up[:5, -10:].mean() > 0.5 > up[-5:, :10].mean()
    assert upsample_attention(np.full(49, 1 / 49), (14, 14)).shape == (14, 14)  # 7x7 grid
    with pytest.raises(ValueError, match="square"):
        upsample_attention(np.ones(60), (10, 10))


def test_attention_figure_has_one_titled_panel_per_word():
    image = np.zeros((30, 40, 3), np.uint8)
    words = ["a", "red", "<unk>", "on", "the", "left", "<end>"]
    attention = np.random.default_rng(0).dirichlet(np.ones(64), len(words))  # (7, 64)
    fig = attention_figure(image, words, attention)
    assert [t.get_text() for t in fig.texts] == words
    assert len(fig.images) == 2 * len(words)  # the image, then its word's map over it
    width, height = fig.get_size_inches() * fig.dpi
    assert round(width) == 5 * (40 + PANEL_GAP_PX)  # 5 columns
    assert round(height) == 2 * (30 + TITLE_PX + PANEL_GAP_PX)  # 2 rows
    x_offsets = sorted({im.ox for im in fig.images})
    assert len(x_offsets) == 5
    empty = attention_figure(image, [], np.zeros((0, 64)))
    assert [t.get_text() for t in empty.texts] == ["(no words)"] and len(empty.images) == 1
    with pytest.raises(ValueError):
        attention_figure(image, words[:2], attention)


# ----------------------------------------------------------------------------- the report


def test_report_writes_page_images_and_one_overlay_per_image(built, world):
    out, summary = built
    ids = sorted(set(summary["sample"]) | set(summary["best"]) | set(summary["worst"]))
    assert len(summary["sample"]) == 3 and summary["overlays"] == len(ids)
    assert sorted(int(p.stem) for p in (out / "overlays").glob("*.png")) == ids
    assert sorted(int(p.stem) for p in (out / "images").glob("*.jpg")) == ids
    for image_id in ids:
        with Image.open(out / "images" / f"{image_id}.jpg") as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 320
        assert (out / "overlays" / f"{image_id}.png").stat().st_size < 200_000


def test_overlay_grid_has_a_column_per_word_up_to_five(built, world):
    out, summary = built
    words = world["per_image"].set_index("image_id")["words"]
    paths = world["table"].drop_duplicates("image_id").set_index("image_id")["path"]
    for image_id in summary["captions"]:
        with Image.open(paths[image_id]) as source:
            panel = source.size[0] + PANEL_GAP_PX  # sources are below OVERLAY_SIDE: not resized
        assert max(source.size) <= OVERLAY_SIDE
        with Image.open(out / "overlays" / f"{image_id}.png") as png:
            width = png.size[0]
        # One panel per word, plus one for <end> when the caption stopped before max_len.
        allowed = {panel * min(5, words[image_id] + end) for end in (0, 1)}
        assert width in allowed, (image_id, width, allowed)


def test_captions_shown_are_the_scored_ones(built, world):
    _, summary = built
    per_image = world["per_image"].set_index("image_id")
    assert summary["caption_mismatches"] == []
    for image_id, caption in summary["captions"].items():
        assert caption == per_image.loc[image_id, "caption"]


def test_every_link_resolves_inside_the_report_folder(built):
    out, _ = built
    page = _parse((out / "index.html").read_text("utf-8"))
    files = [link for link in page.links if not link.startswith("#")]
    assert files, "the page links no files"
    for link in files:
        assert "://" not in link and not link.startswith("/"), link
        assert (out / link).is_file(), link
    on_disk = {f"{d}/{p.name}" for d in ("overlays", "images") for p in (out / d).iterdir()}
    assert on_disk == set(files)
    # Self-contained: no stylesheet links or external scripts.
    assert not [t for t, a in page.tags if t == "link" or (t == "script" and "src" in a)]


def test_captions_and_references_are_escaped(built):
    out, summary = built
    text = (out / "index.html").read_text("utf-8")
    assert TEST_IDS[3] in summary["best"][:1]
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; a red square &amp;" in text
    assert text.count("<script>") == 1  # the page's own load check
    assert "<unk>" not in text and "<end>" not in text


def test_best_and_worst_galleries_list_ten_each_in_order(built, world):
    out, summary = built
    ranked = world["per_image"].sort_values(["CIDEr", "image_id"], ascending=[False, True])
    assert summary["best"] == ranked["image_id"].tolist()[:10]
    lowest = world["per_image"].sort_values(["CIDEr", "image_id"])["image_id"].tolist()
    assert summary["worst"] == lowest[:10]
    text = (out / "index.html").read_text("utf-8")
    assert "10 best by CIDEr" in text and "10 worst by CIDEr" in text
    best_part = text[text.index('id="best"') : text.index('id="worst"')]
    positions = [best_part.index(f'src="images/{i}.jpg"') for i in summary["best"]]
    assert positions == sorted(positions)


def test_empty_captions_and_few_images(world, tmp_path):
    """A model that stops at once: one <end> panel each, "" captions read back from CSV as NaN."""
    model = build_captioner(world["model"].model_config, world["model"].vocabulary, seed=0)
    bias = model.decoder.fc2.bias
    bias.assign(bias.numpy() + 100.0 * (np.arange(bias.shape[0]) == END_ID))
    per_image = world["per_image"].iloc[:5].assign(caption="", words=0)
    per_image.to_csv(tmp_path / "per_image.csv", index=False)
    per_image = pd.read_csv(tmp_path / "per_image.csv")  # as the stage reads it: NaN captions
    out = tmp_path / "few"
    summary = build_report(
        model,
        world["store"],
        world["table"],
        per_image,
        world["report"],
        world["evaluate"],
        out,
    )
    assert len(summary["best"]) == 3 and len(summary["worst"]) == 2
    assert set(summary["captions"].values()) == {""} and summary["caption_mismatches"] == []
    text = (out / "index.html").read_text("utf-8")
    assert "3 best by CIDEr" in text and "2 worst by CIDEr" in text and "(empty)" in text
    for image_id in summary["captions"]:
        with Image.open(world["table"].set_index("image_id").loc[image_id, "path"].iloc[0]) as src:
            one_panel = src.size[0] + PANEL_GAP_PX
        with Image.open(out / "overlays" / f"{image_id}.png") as png:
            assert png.size[0] == one_panel  # the <end> map alone


def test_rerun_gives_the_same_bytes(built, world, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    (again / "overlays").mkdir(parents=True)
    (again / "overlays" / "stale.png").write_bytes(b"old")  # a previous run's leftovers go
    _build(world, again)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert files(again) == files(out)


def test_mismatched_per_image_captions_are_reported(world, tmp_path):
    per_image = world["per_image"].copy()
    per_image.loc[per_image["image_id"] == TEST_IDS[3], "caption"] = "something else"
    summary = _build(world, tmp_path / "mismatch", per_image)
    assert summary["caption_mismatches"] == [TEST_IDS[3]]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_page_loads_in_headless_chromium_with_no_broken_images(built, tmp_path):
    out, _ = built
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        (out / "index.html").resolve().as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    body = _parse(dom)
    attrs = next(a for t, a in body.tags if t == "body")
    assert attrs.get("data-broken") == "0", dom[:500]
    shown = [a["src"] for t, a in body.tags if t == "img"]
    written = [
        a["src"] for t, a in _parse((out / "index.html").read_text("utf-8")).tags if t == "img"
    ]
    assert shown == written


@pytest.mark.slow
def test_stage_writes_the_report_and_logs_it_to_mlflow(world, tmp_path):
    """stages/report.py end to end in a scratch repo: saved model, params.yaml, sqlite MLflow."""
    import json
    import os
    import sys

    import mlflow
    import yaml

    repo = Path(__file__).resolve().parents[1]
    world["model"].save(tmp_path / "captioner.keras")
    world["table"].to_parquet(tmp_path / "captions.parquet", index=False)
    per_image = world["per_image"]
    per_image.to_csv(tmp_path / "per_image.csv", index=False)
    predictions = [
        {"image_id": int(i), "caption": c}
        for i, c in zip(per_image["image_id"], per_image["caption"], strict=True)
    ]
    predictions[0]["caption"] = "not what the model says"
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    evaluate = world["evaluate"]
    params = {
        "evaluate": {
            "split": "test",
            "max_len": evaluate.max_len,
            "batch_size": evaluate.batch_size,
        },
        "report": {"num_images": 3, "seed": 0},
        "train": {"smoothing_epochs": 1, "min_delta": 0.01},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # A training history whose val CIDEr rose to the end: the page must say so.
    pd.DataFrame(
        {"epoch": [1, 2, 3], "val_CIDEr": [0.5, 0.8, 1.1], "pairs_seen": [100, 200, 300]}
    ).to_csv(tmp_path / "history.csv", index=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [
            sys.executable,
            "-P",  # keep stages/ off sys.path: stages/tokenize.py would shadow the stdlib's
            str(repo / "stages" / "report.py"),
            "--model",
            "captioner.keras",
            "--features",
            str(world["store"].root),
            "--table",
            "captions.parquet",
            "--predictions",
            "predictions.json",
            "--per-image",
            "per_image.csv",
            "--run",
            "mlflow_run.json",  # absent: the stage opens a new run
            "--history",
            "history.csv",
            "--out",
            "attention",
        ],
        cwd=tmp_path,
        env=env | {"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "differ from evaluate's" in done.stderr and str(TEST_IDS[0]) in done.stderr
    page = (tmp_path / "attention" / "index.html").read_text()
    assert "report: WARNING training still improving" in done.stderr
    assert "Training warning:</strong> still improving" in page
    assert "at the last epoch (3, 300 caption pairs" in page

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "attention")}
    assert {"attention/index.html", "attention/overlays", "attention/images"} <= logged
