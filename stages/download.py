"""Stage `download`: make the configured data source available in the COCO 2014 layout."""

import argparse

from captioning.config import load_section
from captioning.data.sources import prepare_source
from captioning.errors import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="raw data folder (data/raw)")
    args = parser.parse_args()
    params = load_section("data")
    root = prepare_source(params, args.out)
    print(f"download: source={params.source} layout at {root}")


if __name__ == "__main__":
    run_stage(main)
