"""Stage `tokenize`: vocabulary of the train captions and every split as int32 ids."""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from captioning.config import load_section
from captioning.data.text import encode_splits
from captioning.errors import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", required=True, help="captions parquet from `validate`")
    parser.add_argument("--out", required=True, help="folder for vocab.json and <split>.npy")
    args = parser.parse_args()
    params = load_section("tokenize")

    table = pd.read_parquet(args.table)
    vocabulary, encoded = encode_splits(
        table["caption"].tolist(),
        table["image_id"].tolist(),
        table["split"].tolist(),
        params.vocab_size,
        params.max_len,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(vocabulary.to_json())
    for split, (tokens, image_ids) in encoded.items():
        np.save(out / f"{split}.npy", tokens)
        np.save(out / f"{split}_image_ids.npy", image_ids)
    sizes = {split: len(ids) for split, (_, ids) in encoded.items()}
    print(f"tokenize: {len(vocabulary)} words, captions per split {sizes}")


if __name__ == "__main__":
    run_stage(main)
