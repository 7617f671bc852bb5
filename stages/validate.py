"""Stage `validate`: the checked caption table, the GX report and the quarantine list."""

import argparse
import json

from captioning.config import load_section
from captioning.data.sources import read_dataset_ref
from captioning.data.validation import validate_dataset
from captioning.errors import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True, help="download output (holds dataset.json)")
    parser.add_argument("--table", required=True, help="caption table parquet to write")
    parser.add_argument("--report-dir", required=True, help="GX result JSON + data docs")
    parser.add_argument("--quarantine", required=True, help="JSON list of rejected images")
    args = parser.parse_args()
    dataset = read_dataset_ref(args.raw)
    summary = validate_dataset(
        dataset["root"],
        load_section("split"),
        load_section("validate"),
        args.table,
        args.report_dir,
        args.quarantine,
    )
    print("validate:", json.dumps(summary, default=str))


if __name__ == "__main__":
    run_stage(main)
