"""The bound on a guidance weight, one check for every entry point (`generate()`, the logits processors, the CLI and
the vLLM plugin).

This file imports only torch: the vLLM plugin loads it by path, as it loads `inserted_layer.py`.
"""

import math
import numbers

import torch

# The magnitude that log-probabilities (and value-head rewards) stay within: a log-probability of -1e4 is a
# probability of e^-10000, far below what any dtype represents. Guidance computes `weight * log_softmax` (ARGS:
# `weight * value`) in float32 and adds it to the scores, so a weight up to half float32's largest number over this
# keeps both finite.
GUIDANCE_MAGNITUDE = 1e4
MAX_GUIDANCE_WEIGHT = torch.finfo(torch.float32).max / (2 * GUIDANCE_MAGNITUDE)


def check_guidance_weight(name: str, value) -> None:
    """A guidance weight is a real number of magnitude at most `MAX_GUIDANCE_WEIGHT`: a bool, string, NaN or
    infinity would otherwise pass through arithmetic silently, and a larger weight overflows the guided scores to
    infinity (every token -inf: greedy decoding emits token 0)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a finite number, got {value!r} ({type(value).__name__}).")
    try:
        magnitude = abs(float(value))
    except OverflowError:  # an integer beyond any float
        magnitude = math.inf
    if not magnitude <= MAX_GUIDANCE_WEIGHT:  # also NaN
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}..."
        raise ValueError(
            f"`{name}` must be a finite number, got {shown}; its magnitude must be at most {MAX_GUIDANCE_WEIGHT:.3g}, "
            "as a larger weight overflows `weight * log_softmax` in float32 and every score becomes -inf. Useful "
            "weights are around 0.1 to 10."
        )


__all__ = ["GUIDANCE_MAGNITUDE", "MAX_GUIDANCE_WEIGHT", "check_guidance_weight"]
