"""Caption text: cleaning, the vocabulary, and encoding to / decoding from ids.

One function cleans captions (`clean_caption`) and one class owns the word <->
id mapping (`Vocabulary`); tokenize, train, evaluate, reports and serving all
go through them, so a word means the same id everywhere. The vocabulary keeps
the tutorial's top-k words plus four special tokens with fixed ids.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

_NOT_WORD = re.compile(r"[^a-z0-9' ]+")
_SPACES = re.compile(r"\s+")


def clean_caption(caption: str) -> str:
    """Lower-case, keep letters, digits and apostrophes, collapse whitespace."""
    text = _NOT_WORD.sub(" ", caption.lower())
    return _SPACES.sub(" ", text).strip()


class Vocabulary:
    """Word <-> id mapping: specials first, then words by count (ties by word)."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, captions: Iterable[str], size: int) -> Vocabulary:
        """The `size` most frequent words of the (already cleaned) captions."""
        counts = collections.Counter(w for c in captions for w in c.split())
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
        return cls(list(SPECIAL_TOKENS) + [w for w, _ in ranked])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def to_json(self) -> str:
        return json.dumps({"words": self.words}, indent=0, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError("vocabulary JSON must be an object with a 'words' list")
        return cls(data["words"])

    def encode(self, caption: str, max_len: int) -> np.ndarray:
        """`<start> words <end>` as int32 ids, cut to `max_len`, padded with 0.

        A caption longer than max_len keeps its `<end>` so the model still
        learns to stop; the words in between are dropped from the tail.
        """
        ids = [self.index.get(w, UNK_ID) for w in clean_caption(caption).split()]
        ids = [START_ID, *ids[: max_len - 2], END_ID]
        out = np.full(max_len, PAD_ID, dtype=np.int32)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, captions: Sequence[str], max_len: int) -> np.ndarray:
        """[m, max_len] int32."""
        out = np.zeros((len(captions), max_len), dtype=np.int32)
        for i, caption in enumerate(captions):
            out[i] = self.encode(caption, max_len)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first `<end>`; `<start>` and `<pad>` are skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(words)


def encode_splits(
    captions: Sequence[str],
    image_ids: Sequence[int],
    splits: Sequence[str],
    size: int,
    max_len: int,
) -> tuple[Vocabulary, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Vocabulary from the train captions, then every split encoded.

    Returns the vocabulary and {split: (tokens (m, max_len) int32, image_ids (m,) int64)},
    rows ordered by (image_id, caption order) so the output is deterministic.
    """
    cleaned = [clean_caption(c) for c in captions]
    train = [c for c, s in zip(cleaned, splits, strict=True) if s == "train"]
    if not train:
        raise ValueError("no train captions: cannot build a vocabulary")
    vocabulary = Vocabulary.build(train, size)
    order = np.argsort(np.asarray(image_ids, dtype=np.int64), kind="stable")
    encoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in sorted(set(splits)):
        rows = [i for i in order if splits[i] == split]
        tokens = vocabulary.encode_batch([cleaned[i] for i in rows], max_len)
        encoded[split] = (tokens, np.asarray([image_ids[i] for i in rows], dtype=np.int64))
    return vocabulary, encoded
