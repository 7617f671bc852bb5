"""Scores by reference caption length: the table behind the DVC plot."""

import numpy as np
import pandas as pd
import pytest

from captioning.evaluation.evaluate import scores_by_length


def test_bins_by_mean_reference_length_and_averages_scores():
    per_image = pd.DataFrame(
        {
            "reference_words": [8.2, 9.8, 12.0, 15.9, 21.4],
            "BLEU-4": [0.1, 0.3, 0.5, 0.7, 0.9],
            "CIDEr": [1.0, 2.0, 3.0, 4.0, 5.0],
            "objects_correct": [True, False, True, True, False],
        }
    )
    table = scores_by_length(per_image, bin_words=4)
    assert list(table.columns) == [
        "reference_words",
        "images",
        "BLEU-4",
        "CIDEr",
        "object_accuracy",
    ]
    assert table["reference_words"].tolist() == [8, 12, 20]
    assert table["images"].tolist() == [2, 2, 1]
    np.testing.assert_allclose(table["BLEU-4"], [0.2, 0.6, 0.9])
    np.testing.assert_allclose(table["CIDEr"], [1.5, 3.5, 5.0])
    np.testing.assert_allclose(table["object_accuracy"], [0.5, 1.0, 0.0])


def test_without_demo_truth_there_is_no_object_accuracy_column():
    per_image = pd.DataFrame({"reference_words": [10.0], "BLEU-4": [0.4], "CIDEr": [1.2]})
    assert "object_accuracy" not in scores_by_length(per_image)
    with pytest.raises(ValueError, match="bin_words"):
        scores_by_length(per_image, bin_words=0)
