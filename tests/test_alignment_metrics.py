"""The alignment benchmark's model-free metrics (benchmarks/alignment_metrics.py)."""

import math

import pytest
from alignment_metrics import distinct_n, mean_and_standard_error, win_outcomes


def test_mean_and_standard_error():
    mean, error = mean_and_standard_error([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    # sample variance (1 + 1 + 0 + 9) / 3 = 14 / 3, over n = 4
    assert error == pytest.approx(math.sqrt(14 / 3 / 4))
    assert math.isnan(mean_and_standard_error([5.0])[1])
    with pytest.raises(ValueError):
        mean_and_standard_error([])


def test_win_outcomes_count_ties_as_half():
    assert win_outcomes([2.0, 1.0, 0.5], [1.0, 1.0, 0.7]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        win_outcomes([1.0], [1.0, 2.0])


def test_distinct_n_counts_word_ngrams_within_each_text():
    # bigrams: (a b) (b a) (a b) in the first text, (b a) in the second; the texts' boundary adds none
    assert distinct_n(["a b a b", "b a"], 2) == pytest.approx(2 / 4)
    assert distinct_n(["the cat sat", "on the mat"], 2) == 1.0
    assert distinct_n(["loop loop loop loop loop"], 2) == pytest.approx(1 / 4)
    assert distinct_n(["one", ""], 2) == 0.0
    assert distinct_n(["a b a"], 1) == pytest.approx(2 / 3)
