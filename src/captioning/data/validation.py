"""The validate stage's library: from a COCO-layout folder to a trusted caption table.

`validate_dataset` reads the layout (`captioning.data.coco_layout`), drops and
counts null or whitespace-only captions, decodes every image once with the
project's one image reader (`check_images` through `captioning.data.images`:
undecodable, truncated, empty and oversized files go to the quarantine list
with a reason), runs the Great Expectations suites of
`captioning.data.captions_suite` (`run_suite`: GX Checkpoints whose
UpdateDataDocsAction builds the data docs), and writes the caption table, the
validation report with GX data docs, and the quarantine list. Hard failures
(nothing left, too much quarantined, a critical expectation failing) raise
`ValidationError` after the reports are written, so the reason is on disk; the
table is then not written. The table, the quarantine list and `result.json` are
byte-for-byte the same for the same inputs (GX's run time is pinned, its random
ids removed); the data docs pages are not, because GX renders the wall clock
and fresh uuid4s into them, so dvc.yaml declares them as an output of their own.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageFile

from captioning.atomic_files import atomic_directory, atomic_path, atomic_write
from captioning.config import SplitParams, ValidateParams
from captioning.data.captions_suite import expectation_specs, run_suite
from captioning.data.coco_layout import TABLE_COLUMNS, caption_table
from captioning.data.images import ImageReadError, decode_image

logger = logging.getLogger(__name__)

_EXAMPLE_ROWS = 5


class ValidationError(RuntimeError):
    """The data set fails a hard check; the message says which and lists offending rows."""


# ---------------------------------------------------------------- images


def _inspect_image(
    path: str, max_pixels: int, min_side: int = 1, max_aspect: float | None = None
) -> tuple[str | None, int, int, str]:
    """Decode one image file fully: `(reason or None, width, height, detail)`.

    Reads through `captioning.data.images.decode_image`, the reader features and
    serving use: the format comes from the content, the pixel bound is checked
    from the header before any pixel is decoded, and width and height are
    those of the upright (EXIF-rotated) image. The reason is that of its
    `ImageReadError`, one of `captioning.data.images.REASONS`.
    """
    try:
        pixels = decode_image(path, max_pixels, None, min_side, max_aspect)  # (H, W, 3) uint8
    except ImageReadError as err:
        return err.reason, 0, 0, err.detail
    except OSError as err:  # present but unreadable (permissions, a folder): do not train on it
        return "decode_error", 0, 0, f"{type(err).__name__}: {err.strerror}"
    height, width = pixels.shape[:2]
    return None, width, height, ""


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_images(
    table: pd.DataFrame,
    max_pixels: int,
    workers: int | None = None,
    min_side: int = 1,
    max_aspect: float | None = None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Decode each distinct image of `table` once; split it into kept rows and a quarantine.

    Returns `(clean_table, quarantine)`: clean_table keeps the captions of images
    that decoded, with `width`/`height` (int64) of the decoded, upright image;
    quarantine is `[{image_id, path, reason, detail}]` sorted by image_id, with
    reason one of empty_file, undecodable, truncated, too_large, decode_error,
    missing_file, too_small (shorter side under `min_side`) and bad_aspect
    (sides further apart than `max_aspect`; both off unless given). The work runs on `workers` threads (default: usable cores).
    """
    images = table.drop_duplicates("image_id")[["image_id", "path"]].reset_index(drop=True)
    paths = images["path"].tolist()
    if not paths:
        return table.iloc[0:0].copy(), []
    workers = max(1, min(workers or _available_cores(), len(paths)))
    # Threads, not processes: Pillow's decoders release the GIL, and a process
    # pool would re-import the caller's __main__ (spawn) or fork a threaded parent.
    # Pillow's guards are module globals. For the duration of the check its bomb
    # guard (which refuses images over twice its bound when opened) uses our
    # bound, so it never rejects an image that `max_pixels` allows, and truncated
    # files fail to load even if some other import relaxed that.
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
        with ThreadPoolExecutor(workers) as pool:
            # map keeps input order, so results do not depend on which thread finished first.
            inspect = functools.partial(
                _inspect_image, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect
            )
            results = list(pool.map(inspect, paths))
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved

    reasons = [r[0] for r in results]
    images["reason"] = reasons
    images["width"] = [r[1] for r in results]
    images["height"] = [r[2] for r in results]
    quarantine = [
        {"image_id": int(image_id), "path": path, "reason": reason, "detail": detail}
        for (image_id, path), (reason, _, _, detail) in zip(
            images[["image_id", "path"]].itertuples(index=False), results, strict=True
        )
        if reason is not None
    ]
    quarantine.sort(key=lambda q: q["image_id"])

    good = images[images["reason"].isna()].set_index("image_id")
    clean = table[table["image_id"].isin(good.index)].copy()
    clean["width"] = clean["image_id"].map(good["width"]).astype("int64")
    clean["height"] = clean["image_id"].map(good["height"]).astype("int64")
    return clean.reset_index(drop=True), quarantine


# ---------------------------------------------------------------- captions


def drop_bad_captions(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Remove null and whitespace-only captions (soft: counted, not fatal)."""
    is_null = table["caption"].isna()
    is_blank = ~is_null & ~table["caption"].astype(str).str.contains(r"\S", regex=True)
    kept = table[~(is_null | is_blank)].reset_index(drop=True)
    counts = {
        "null_captions": int(is_null.sum()),
        "blank_captions": int(is_blank.sum()),
        "images_left_without_captions": int(
            table["image_id"].nunique() - kept["image_id"].nunique()
        ),
    }
    return kept, counts


def check_quarantine(
    n_images: int, quarantine: list[dict[str, Any]], params: ValidateParams
) -> None:
    """Raise ValidationError when no image is usable or too many were quarantined."""
    if n_images == 0:
        raise ValidationError("no images to validate: the caption table is empty")
    fraction = len(quarantine) / n_images
    rows = "\n".join(
        f"  image_id={q['image_id']} {Path(q['path']).name}: {q['reason']} ({q['detail']})"
        for q in quarantine[:_EXAMPLE_ROWS]
    )
    if len(quarantine) == n_images:
        raise ValidationError(
            f"no images left: all {n_images} images were quarantined, e.g.\n{rows}"
        )
    if fraction > params.max_quarantine_fraction:
        raise ValidationError(
            f"{len(quarantine)} of {n_images} images quarantined ({fraction:.1%}) > "
            f"validate.max_quarantine_fraction={params.max_quarantine_fraction:.1%}; "
            f"first ones:\n{rows}"
        )


# ---------------------------------------------------------------- the stage


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")


def _counts(
    layout_stats: dict[str, Any],
    caption_counts: dict[str, int],
    checked: pd.DataFrame,
    clean: pd.DataFrame,
    quarantine: list[dict[str, Any]],
) -> dict[str, Any]:
    reasons = sorted({q["reason"] for q in quarantine})
    return {
        "layout": layout_stats,
        "captions": caption_counts,
        "images_checked": int(checked["image_id"].nunique()),
        "images_quarantined": len(quarantine),
        "quarantine_reasons": {r: sum(q["reason"] == r for q in quarantine) for r in reasons},
        "images_kept": int(clean["image_id"].nunique()),
        "captions_kept": int(len(clean)),
        "images_per_split": {
            name: int(clean.loc[clean["split"] == name, "image_id"].nunique())
            for name in ("train", "val", "test")
        },
    }


def _soft_warnings(counts: dict[str, Any], soft_failures: list[dict[str, Any]]) -> list[str]:
    found = [f"{f['frame']}: {f['expectation']} {f['kwargs']}: {f['why']}" for f in soft_failures]
    missing = counts["layout"]["missing_image_files"]
    if missing:
        found.append(f"{missing} annotated images have no file and were dropped")
    dropped = counts["captions"]["null_captions"] + counts["captions"]["blank_captions"]
    if dropped:
        found.append(f"{dropped} null or whitespace-only captions were dropped")
    return found


def _quarantine_list(table: pd.DataFrame, quarantine: list[dict[str, Any]]) -> list[dict]:
    """The quarantine as written to disk: `[{image_id, file_name, reason, detail}]`."""
    file_names = dict(zip(table["image_id"], table["file_name"], strict=True))
    return [
        {"image_id": q["image_id"], "file_name": file_names[q["image_id"]]}
        | {"reason": q["reason"], "detail": q["detail"]}
        for q in quarantine
    ]


def _write_report(
    out_report_dir: Path,
    clean: pd.DataFrame,
    counts: dict[str, Any],
    quarantine: list[dict[str, Any]],
    params: ValidateParams,
    seconds: dict[str, float],
) -> tuple[dict[str, Any], ValidationError | None]:
    """Run the hard checks and the suites, write `result.json` and data docs; return both.

    The error is returned, not raised, so the report is on disk before the caller raises it.
    """
    report: dict[str, Any] = {"success": False, "counts": counts}
    report.update(hard_failures=[], soft_failures=[])
    error: ValidationError | None = None
    # The report folder is swapped in whole, so a kill never leaves half a report.
    with atomic_directory(out_report_dir) as staged:
        try:
            check_quarantine(counts["images_checked"], quarantine, params)
        except ValidationError as err:
            error = err
            report["hard_failures"].append({"check": "quarantine", "message": str(err)})
        if error is None:
            suite = run_suite(clean, params, data_docs_dir=staged / "data_docs")
            seconds["suite"] = suite.seconds
            report["success"] = suite.success
            report["hard_failures"] = suite.hard_failures
            report["soft_failures"] = suite.soft_failures
            report["expectations"] = [check._asdict() for check in expectation_specs(params)]
            report["gx_results"] = suite.results
            if not suite.success:
                error = ValidationError("hard expectations failed:\n" + suite.message())
        (staged / "result.json").write_bytes(_json_bytes(report))
    return report, error


def validate_dataset(
    root: str | Path,
    split: SplitParams,
    params: ValidateParams,
    out_table: str | Path,
    out_report_dir: str | Path,
    out_quarantine: str | Path,
) -> dict[str, Any]:
    """Validate a COCO-layout folder and write the table, the report and the quarantine list.

    Writes `out_table` (parquet, the caption table of docs/design.md),
    `out_report_dir/result.json` (counts, failures by severity, the suite and
    the GX results), `out_report_dir/data_docs/index.html` and `out_quarantine`
    (`[{image_id, file_name, reason, detail}]` by image_id). Returns a summary
    (counts, soft warnings, seconds per step). On a hard failure the report and
    quarantine list are written, a stale table is removed and ValidationError
    is raised.
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    table, layout_stats = caption_table(root, split)
    table, caption_counts = drop_bad_captions(table)
    seconds["layout"] = time.perf_counter() - start

    start = time.perf_counter()
    clean, quarantine = check_images(
        table, params.max_pixels, min_side=params.min_side, max_aspect=params.max_aspect
    )
    seconds["images"] = time.perf_counter() - start
    counts = _counts(layout_stats, caption_counts, table, clean, quarantine)

    report, error = _write_report(Path(out_report_dir), clean, counts, quarantine, params, seconds)
    atomic_write(out_quarantine, _json_bytes(_quarantine_list(table, quarantine)))
    if error is not None:
        # A table from an earlier, passing run must not look like this run's output.
        Path(out_table).unlink(missing_ok=True)
        raise error

    found = _soft_warnings(counts, report["soft_failures"])
    for warning in found:
        logger.warning("validate: %s", warning)
    with atomic_path(out_table, ".parquet") as tmp:
        clean[TABLE_COLUMNS].to_parquet(tmp, engine="pyarrow", index=False)
    return {"success": True, "counts": counts, "warnings": found, "seconds": seconds}
