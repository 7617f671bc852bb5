"""Tests for captioning.data.validation: image quarantine, the GX suites, and the validate stage's outputs.

A module-scoped "zoo" folder in the COCO 2014 layout holds real files written
with Pillow: plain, grayscale, CMYK, palette and RGBA images (kept), and a
truncated JPEG, a zero-byte file, random bytes and a PNG header claiming
10^10 pixels (quarantined), plus a whitespace-only caption and an annotation
whose image file is missing. The last test runs the suites on the real COCO
val2014 caption sample in /work/shared (skipped where it is absent).
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageFile

from captioning.config import SplitParams, ValidateParams
from captioning.data.captions_suite import run_suite
from captioning.data.coco_layout import (
    TABLE_COLUMNS,
    assign_splits,
    caption_table,
    read_annotations,
)
from captioning.data.validation import (
    ValidationError,
    check_images,
    drop_bad_captions,
    validate_dataset,
)

SAMPLE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "coco_val2014_sample"
    / "captions_val2014_sample.json"
)
KEPT_SPECIAL = {2: "L", 3: "CMYK", 4: "P", 5: "RGBA"}
QUARANTINED = {6: "truncated", 7: "empty_file", 8: "undecodable", 9: "too_large"}
MISSING_ID = 10
VAL_IDS = range(101, 113)
# Tolerates the zoo's 4 of 21 quarantined images; the default 5% does not.
LENIENT = ValidateParams(max_quarantine_fraction=0.25)


def png_header(width: int, height: int) -> bytes:
    """A PNG with only a header (and no pixel data) claiming width x height."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def build_zoo(root: Path) -> Path:
    names = {"train2014": {}, "val2014": {}}
    files: dict[Path, bytes] = {}
    captions: dict[int, list[str]] = {}

    def add(folder: str, image_id: int, data: bytes | None, caps, suffix=".jpg") -> None:
        name = f"COCO_{folder}_{image_id:012d}{suffix}"
        names[folder][image_id] = name
        captions[image_id] = caps
        if data is not None:
            files[root / folder / name] = data

    noise = Image.effect_noise((64, 48), 60).convert("RGB")
    jpeg = encode(noise, "JPEG")
    add("train2014", 1, jpeg, ["a noisy picture", " \t "])
    add("train2014", 2, encode(Image.new("L", (40, 30), 128), "JPEG"), ["a grey square"])
    add("train2014", 3, encode(Image.new("CMYK", (41, 30), (0, 9, 9, 0)), "JPEG"), ["cmyk"])
    add("train2014", 4, encode(Image.new("P", (42, 30), 3), "PNG"), ["a palette"], ".png")
    # A PNG under a .jpg name: the content decides the format.
    add("train2014", 5, encode(Image.new("RGBA", (43, 30), (1, 2, 3, 4)), "PNG"), ["rgba"])
    add("train2014", 6, jpeg[: len(jpeg) // 2], ["cut in half"])
    add("train2014", 7, b"", ["nothing"])
    add("train2014", 8, random.Random(0).randbytes(700), ["noise bytes"])
    add("train2014", 9, png_header(100_000, 100_000), ["a bomb"])
    add("train2014", MISSING_ID, None, ["never downloaded"])
    for image_id in VAL_IDS:
        image = Image.new("RGB", (30 + image_id % 7, 20), (image_id, 0, 0))
        add("val2014", image_id, encode(image, "JPEG"), [f"val {image_id}", f"red {image_id}"])

    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for folder, by_id in names.items():
        payload = {
            "images": [
                {"id": i, "file_name": n, "width": 1, "height": 1} for i, n in by_id.items()
            ],
            "annotations": [
                {"image_id": i, "id": 100 * i + k, "caption": c}
                for i in by_id
                for k, c in enumerate(captions[i])
            ],
        }
        ann = root / "annotations" / f"captions_{folder}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps(payload), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def zoo_table(zoo) -> pd.DataFrame:
    table, _ = caption_table(zoo, SplitParams())
    return drop_bad_captions(table)[0]


def outputs(base: Path) -> dict[str, Path]:
    return {
        "out_table": base / "interim" / "captions.parquet",
        "out_report_dir": base / "reports" / "validation",
        "out_quarantine": base / "reports" / "quarantine.json",
    }


# ---------------------------------------------------------------- check_images


def test_check_images_quarantines_broken_and_keeps_convertible(zoo_table):
    clean, quarantine = check_images(zoo_table, max_pixels=89_478_485)
    assert {q["image_id"]: q["reason"] for q in quarantine} == QUARANTINED
    assert [q["image_id"] for q in quarantine] == sorted(QUARANTINED)
    assert all(set(q) == {"image_id", "path", "reason", "detail"} for q in quarantine)
    assert "truncated" in next(q["detail"] for q in quarantine if q["image_id"] == 6)

    kept = set(clean["image_id"])
    assert set(KEPT_SPECIAL) | {1} | set(VAL_IDS) == kept
    sizes = clean.drop_duplicates("image_id").set_index("image_id")
    assert str(clean["width"].dtype) == "int64" and str(clean["height"].dtype) == "int64"
    # sizes come from the decoded file, not from the annotation (which says 1x1)
    assert (sizes.loc[1, "width"], sizes.loc[1, "height"]) == (64, 48)
    for image_id in KEPT_SPECIAL:
        with Image.open(sizes.loc[image_id, "path"]) as image:
            assert image.mode == KEPT_SPECIAL[image_id]
            assert sizes.loc[image_id, "width"] == image.size[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_files_fail_even_if_pillow_was_relaxed(zoo_table, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _, quarantine = check_images(zoo_table, max_pixels=89_478_485)
    assert {q["image_id"]: q["reason"] for q in quarantine}[6] == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_check_images_max_pixels_from_header_and_pillow_guard(zoo_table):
    before = Image.MAX_IMAGE_PIXELS
    # 40x30=1200 > 1000 (Pillow's warning range, raised as an error); 64x48 is beyond 2x.
    clean, quarantine = check_images(zoo_table, max_pixels=1000)
    reasons = {q["image_id"]: q["reason"] for q in quarantine}
    assert all(reasons[i] == "too_large" for i in (1, 2, 3, 4, 5, 9))
    assert set(clean["image_id"]) == set(VAL_IDS)  # 30..36 x 20 <= 720 pixels
    assert before == Image.MAX_IMAGE_PIXELS  # restored


def test_check_images_is_deterministic_across_worker_counts(zoo_table):
    one = check_images(zoo_table, 89_478_485, workers=1)
    two = check_images(zoo_table, 89_478_485, workers=2)
    pd.testing.assert_frame_equal(one[0], two[0])
    assert one[1] == two[1]


def test_check_images_on_empty_table(zoo_table):
    clean, quarantine = check_images(zoo_table.iloc[0:0], 1000)
    assert clean.empty and quarantine == []


def test_webp_bmp_and_tiff_images_pass(tmp_path):
    rows = []
    for image_id, fmt in enumerate(("WEBP", "BMP", "TIFF"), start=1):
        path = tmp_path / f"{image_id}.jpg"  # the content decides the format
        path.write_bytes(encode(Image.new("RGB", (20 + image_id, 10), (image_id, 2, 3)), fmt))
        rows.append({"image_id": image_id, "path": str(path), "caption": f"a {fmt} picture"})
    clean, quarantine = check_images(pd.DataFrame(rows), max_pixels=89_478_485)
    assert quarantine == []
    assert clean["width"].tolist() == [21, 22, 23] and clean["height"].tolist() == [10] * 3


def test_exif_rotated_image_records_its_upright_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored sideways, shown turned 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(path, "JPEG", exif=exif)
    clean, quarantine = check_images(
        pd.DataFrame({"image_id": [1], "path": [str(path)], "caption": ["a phone photo"]}),
        max_pixels=89_478_485,
    )
    assert quarantine == []
    assert (clean.loc[0, "width"], clean.loc[0, "height"]) == (30, 40)


def test_drop_bad_captions_counts():
    table = pd.DataFrame({"image_id": [1, 1, 2, 3], "caption": ["ok", "  ", None, "\n\t"]})
    kept, counts = drop_bad_captions(table)
    assert kept["caption"].tolist() == ["ok"]
    assert counts == {"null_captions": 1, "blank_captions": 2, "images_left_without_captions": 2}


# ---------------------------------------------------------------- run_suite


@pytest.fixture(scope="module")
def clean_table(zoo_table) -> pd.DataFrame:
    return check_images(zoo_table, 89_478_485)[0]


def test_suite_passes_on_clean_table_and_builds_docs(clean_table, tmp_path):
    result = run_suite(clean_table, ValidateParams(), data_docs_dir=tmp_path / "docs")
    assert result.success, result.message()
    assert result.hard_failures == [] and result.soft_failures == []
    assert set(result.results) == {"caption_rows", "images"}
    assert all(r["success"] for r in result.results.values())
    # Each Checkpoint's UpdateDataDocsAction rendered its validation result into the site.
    index = (tmp_path / "docs" / "index.html").read_text(encoding="utf-8")
    pages = sorted((tmp_path / "docs" / "validations").rglob("*.html"))
    assert [p.name for p in pages] == [
        "caption_table-caption_rows.html",
        "caption_table-images.html",
    ]
    for page in pages:
        assert page.relative_to(tmp_path / "docs").as_posix() in index
    for page in pages:  # GX marks a failed expectation with a cross icon
        assert "fa-times" not in page.read_text(encoding="utf-8")
    suites = sorted(p.name for p in (tmp_path / "docs" / "expectations").glob("*.html"))
    assert suites == ["caption_rows.html", "images.html"]


def test_failed_checkpoint_shows_in_data_docs(clean_table, tmp_path):
    broken = pd.concat([clean_table, clean_table.iloc[[0]].assign(caption="   ")])
    result = run_suite(broken, ValidateParams(), data_docs_dir=tmp_path / "docs")
    assert not result.success
    [page] = (tmp_path / "docs" / "validations" / "caption_rows").rglob("*.html")
    assert "fa-times" in page.read_text(encoding="utf-8")


def test_suite_hard_failures_list_offending_rows(clean_table):
    broken = clean_table.copy()
    leaked = broken[broken["image_id"] == 101].assign(split="train")  # same image in two splits
    blank = broken.iloc[[0]].assign(caption="   ")
    broken = pd.concat([broken, leaked, blank], ignore_index=True)
    result = run_suite(broken, ValidateParams())
    assert not result.success
    failed = {(f["frame"], f["expectation"]) for f in result.hard_failures}
    assert failed == {
        ("images", "expect_column_values_to_be_unique"),
        ("images", "expect_column_values_to_be_between"),  # n_splits == 1
        ("caption_rows", "expect_column_values_to_match_regex"),
    }
    message = result.message()
    assert "'image_id': 101" in message and "n_splits" in message
    assert "'caption': '   '" in message


def test_suite_soft_failures_do_not_fail(clean_table):
    result = run_suite(clean_table, ValidateParams(max_caption_words=1))
    assert result.success
    [soft] = result.soft_failures
    assert soft["kwargs"]["column"] == "n_words" and soft["unexpected_count"] > 0
    assert soft["examples"] and "caption" in soft["examples"][0]


def test_suite_rejects_wrong_types_and_empty_tables(clean_table):
    floats = clean_table.astype({"width": "float64"})
    assert not run_suite(floats, ValidateParams()).success
    empty = run_suite(clean_table.iloc[0:0], ValidateParams())
    assert not empty.success
    assert "expect_table_row_count_to_be_between" in empty.message()


# ---------------------------------------------------------------- validate_dataset


def test_validate_dataset_outputs_and_counts(zoo, tmp_path):
    out = outputs(tmp_path)
    summary = validate_dataset(zoo, SplitParams(), LENIENT, **out)
    counts = summary["counts"]
    assert summary["success"]
    assert counts["layout"]["missing_image_files"] == 1
    assert counts["layout"]["missing_image_examples"] == ["COCO_train2014_000000000010.jpg"]
    assert counts["captions"]["blank_captions"] == 1
    assert counts["images_checked"] == 9 + len(VAL_IDS)
    assert counts["quarantine_reasons"] == {
        "empty_file": 1,
        "too_large": 1,
        "truncated": 1,
        "undecodable": 1,
    }
    assert counts["images_kept"] == 5 + len(VAL_IDS)
    assert any("no file" in w for w in summary["warnings"])
    assert set(summary["seconds"]) == {"layout", "images", "suite"}

    table = pd.read_parquet(out["out_table"])
    assert list(table.columns) == TABLE_COLUMNS
    assert {str(table[c].dtype) for c in ("image_id", "width", "height")} == {"int64"}
    assert table["caption"].str.strip().ne("").all()
    assert table.groupby("image_id")["split"].nunique().max() == 1

    quarantine = json.loads(out["out_quarantine"].read_text())
    assert [q["image_id"] for q in quarantine] == sorted(QUARANTINED)
    assert quarantine[0] == {
        "image_id": 6,
        "file_name": "COCO_train2014_000000000006.jpg",
        "reason": "truncated",
        "detail": quarantine[0]["detail"],
    }
    report = json.loads((out["out_report_dir"] / "result.json").read_text())
    assert report["success"] and report["counts"] == counts
    assert set(report["gx_results"]) == {"caption_rows", "images"}
    assert (out["out_report_dir"] / "data_docs" / "index.html").is_file()
    # atomic writes leave no temporary siblings behind
    assert sorted(p.name for p in out["out_report_dir"].parent.iterdir()) == [
        "quarantine.json",
        "validation",
    ]
    assert [p.name for p in out["out_table"].parent.iterdir()] == ["captions.parquet"]


def test_validate_dataset_is_byte_for_byte_deterministic(zoo, tmp_path):
    first, second = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    validate_dataset(zoo, SplitParams(), LENIENT, **first)
    validate_dataset(zoo, SplitParams(), LENIENT, **second)
    for key in ("out_table", "out_quarantine"):
        assert first[key].read_bytes() == second[key].read_bytes(), key
    result = "result.json"
    assert (first["out_report_dir"] / result).read_bytes() == (
        second["out_report_dir"] / result
    ).read_bytes()
    # The data docs are a DVC output of their own: the same pages, though GX
    # renders the wall clock and random ids into them.
    pages_a, pages_b = (
        sorted(p.relative_to(o["out_report_dir"]) for p in o["out_report_dir"].rglob("*"))
        for o in (first, second)
    )
    assert pages_a == pages_b


def test_too_many_quarantined_is_a_hard_failure(zoo, tmp_path):
    out = outputs(tmp_path)
    out["out_table"].parent.mkdir(parents=True)
    out["out_table"].write_bytes(b"stale table from an earlier run")
    with pytest.raises(ValidationError) as err:
        validate_dataset(zoo, SplitParams(), ValidateParams(), **out)
    message = str(err.value)
    assert "4 of 21 images quarantined" in message and "max_quarantine_fraction" in message
    assert "COCO_train2014_000000000006.jpg: truncated" in message
    assert not out["out_table"].exists()
    report = json.loads((out["out_report_dir"] / "result.json").read_text())
    assert report["success"] is False and report["hard_failures"][0]["check"] == "quarantine"
    assert len(json.loads(out["out_quarantine"].read_text())) == 4


def test_everything_quarantined_is_a_hard_failure(tmp_path):
    root = tmp_path / "broken"
    for folder, image_id, data in (("train2014", 1, b""), ("val2014", 2, b"not an image")):
        name = f"COCO_{folder}_{image_id:012d}.jpg"
        (root / folder).mkdir(parents=True)
        (root / folder / name).write_bytes(data)
        ann = root / "annotations" / f"captions_{folder}.json"
        ann.parent.mkdir(exist_ok=True)
        ann.write_text(
            json.dumps(
                {
                    "images": [{"id": image_id, "file_name": name}],
                    "annotations": [{"image_id": image_id, "caption": "a caption"}],
                }
            )
        )
    params = ValidateParams(max_quarantine_fraction=1.0)
    with pytest.raises(ValidationError, match="no images left: all 2 images were quarantined"):
        validate_dataset(root, SplitParams(), params, **outputs(tmp_path / "out"))


# ---------------------------------------------------------------- real COCO captions


@pytest.mark.skipif(not SAMPLE.is_file(), reason="shared COCO val2014 caption sample not present")
def test_real_coco_captions_pass_the_suite():
    images, captions = read_annotations(SAMPLE)
    assert len(images) == 1000 and len(captions) == 5005
    splits = assign_splits([], images["image_id"], SplitParams())
    table = captions.merge(images, on="image_id").merge(splits, on="image_id")
    # No pixels here: stand in the annotation's own sizes for the decoded ones.
    table["path"] = "val2014/" + table["file_name"]
    table = table.astype({"width": "int64", "height": "int64"})[TABLE_COLUMNS]
    result = run_suite(table, ValidateParams())
    assert result.success, result.message()
    # The sample is val2014 only, so the "all three splits present" warning is expected.
    assert [(f["expectation"], f["kwargs"]["column"]) for f in result.soft_failures] == [
        ("expect_column_distinct_values_to_contain_set", "split")
    ]
    assert result.results["images"]["statistics"]["unsuccessful_expectations"] == 0
