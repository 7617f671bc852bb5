"""Caption cleaning, the vocabulary and encoding/decoding."""

import numpy as np
import pytest

from captioning.data.text import (
    END_ID,
    PAD_ID,
    START_ID,
    UNK_ID,
    Vocabulary,
    clean_caption,
    encode_splits,
)


def test_clean_caption_lowercases_and_strips_punctuation():
    assert clean_caption("  A Red, CIRCLE!\tat the top-left.  ") == "a red circle at the top left"
    assert clean_caption("the dog's ball") == "the dog's ball"


def test_vocabulary_orders_by_count_then_word_and_caps_size():
    vocab = Vocabulary.build(["b a", "a c", "a b", "d"], size=2)
    assert vocab.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "b"]
    assert len(vocab) == 6


def test_encode_decode_round_trip_with_unknown_and_padding():
    vocab = Vocabulary.build(["a red circle", "a blue square"], size=10)
    ids = vocab.encode("A red hexagon", max_len=8)
    assert ids.dtype == np.int32 and ids.shape == (8,)
    assert ids[0] == START_ID and UNK_ID in ids and END_ID in ids
    assert ids[-1] == PAD_ID
    assert vocab.decode(ids) == "a red <unk>"


def test_long_caption_is_cut_but_keeps_end():
    vocab = Vocabulary.build(["w " * 30], size=5)
    ids = vocab.encode("w " * 30, max_len=6)
    assert list(ids) == [START_ID, 4, 4, 4, 4, END_ID]


def test_json_round_trip_and_bad_json():
    vocab = Vocabulary.build(["x y z"], size=5)
    assert Vocabulary.from_json(vocab.to_json()) == vocab
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="'words' list"):
        Vocabulary.from_json("[1, 2]")


def test_encode_splits_uses_train_words_only_and_is_ordered_by_image():
    vocab, enc = encode_splits(
        ["zebra on grass", "a cat", "a dog"], [5, 2, 9], ["test", "train", "train"], 100, 6
    )
    assert "zebra" not in vocab.index
    tokens, ids = enc["train"]
    assert list(ids) == [2, 9]
    assert vocab.decode(tokens[1]) == "a dog"
    assert vocab.decode(enc["test"][0][0]) == "<unk> <unk> <unk>"
