"""Per-row metrics of the alignment benchmark that need no model: mean with standard error, win rate, distinct-n."""

import math


def mean_and_standard_error(samples: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation over sqrt(n)); the error is nan for one sample."""
    n = len(samples)
    if n == 0:
        raise ValueError("No samples to average.")
    mean = sum(samples) / n
    if n == 1:
        return mean, math.nan
    variance = sum((sample - mean) ** 2 for sample in samples) / (n - 1)
    return mean, math.sqrt(variance / n)


def win_outcomes(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """Per prompt: 1 where `scores` beats the baseline, 0.5 on a tie, 0 where it loses."""
    if len(scores) != len(baseline_scores):
        raise ValueError(f"{len(scores)} scores against {len(baseline_scores)} baseline scores.")
    return [1.0 if score > base else 0.5 if score == base else 0.0 for score, base in zip(scores, baseline_scores)]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams of `texts` (Li et al. 2016); n-grams never span two texts.

    Repetitive answers (a guided decoder looping on phrases its reward likes) score low. 0 when no text has n words.
    """
    ngrams = [tuple(words[i : i + n]) for words in (text.split() for text in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0
