"""DExperts-style steering by the expert and anti-expert heads, in the forward that computes the original logits.

`model.generate(**inputs, expert_weight=alpha)` decodes from
`logits + alpha * (log_softmax(expert_logits) - log_softmax(anti_expert_logits))`. DExperts (Liu et al., ACL 2021)
writes `logits + alpha * (expert_logits - anti_expert_logits)`; the two differ per row by a constant (the difference
of the two heads' log-normalisers), so greedy search and sampling, with every warper (temperature, top-k, top-p),
pick exactly as DExperts' formula does. The log-softmax form is used because beam search adds the processed scores
of each step to its beams' running scores: there a per-row constant would favour the beams whose heads happen to
have the larger normaliser, while a difference of log-probabilities (the log of the expert-to-anti-expert
probability ratio) does not depend on the heads' arbitrary logit offsets.

transformers hands a logits processor only `(input_ids, scores)`, so for the length of one `generate()` call two
hooks on the model connect them: a forward pre-hook asks every forward for both heads' logits, and a forward hook
hands the processor the ones of the forward whose logits it is about to process. No other forward runs, so every
decoding strategy of transformers that runs one forward per step (greedy, sampling, beam search, streamers)
applies. A custom decoding loop uses the same processor inside `with expert_guidance(model, alpha) as processor:`.

This file imports only torch and transformers, so it ships with a checkpoint as remote code.
"""

import contextlib
from collections.abc import Iterator

import torch
from transformers import LogitsProcessor

from .guidance_weight import check_guidance_weight

# A larger weight leaves nothing of the base model's logits and overflows float16 scores; DExperts uses 0.5 to 3.2.
MAX_EXPERT_WEIGHT = 1000.0


def check_expert_weight(name: str, value) -> None:
    """A steering weight is a finite number (`check_guidance_weight`) of magnitude at most `MAX_EXPERT_WEIGHT`."""
    check_guidance_weight(name, value)
    if value is not None and abs(value) > MAX_EXPERT_WEIGHT:
        raise ValueError(f"`{name}` must be between -{MAX_EXPERT_WEIGHT:g} and {MAX_EXPERT_WEIGHT:g}, got {value!r}.")


class ExpertGuidanceLogitsProcessor(LogitsProcessor):
    r"""
    Adds `weight * (log_softmax(expert_logits) - log_softmax(anti_expert_logits))` of the model's latest forward
    to the scores (see the module docstring for why log-softmax).

    Built and connected by `model.generate(expert_weight=...)`, or by `expert_guidance(model, weight)` for a custom
    decoding loop. generate() places it after its own processors (repetition penalty, ...) and before the sampling
    warpers (temperature, top-k, top-p), so the warpers act on the steered scores.

    Example (a custom greedy loop):

    ```python
    >>> from otter_hf.generation import expert_guidance

    >>> with torch.no_grad(), expert_guidance(otter_model, weight=2.0) as steer:
    ...     outputs = otter_model(input_ids, use_cache=True)
    ...     next_token = steer(input_ids, outputs.logits[:, -1]).argmax(-1)
    ```
    """

    def __init__(self, weight: float):
        self.weight = float(weight)
        self._expert_logits: tuple[torch.Tensor, torch.Tensor] | None = None

    def record_expert_logits(self, module, args, output) -> None:
        self._expert_logits = (output.expert_logits[:, -1], output.anti_expert_logits[:, -1])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        recorded, self._expert_logits = self._expert_logits, None
        if recorded is None or recorded[0].shape != scores.shape:
            raise RuntimeError(
                "Expert steering adds the expert heads' logits of the forward whose scores it processes; it runs "
                "inside `model.generate(expert_weight=...)` or `with expert_guidance(model, weight)`, one forward "
                "of the model before each call, as greedy search, sampling and beam search run it."
            )
        expert, anti_expert = (logits.to(torch.float32).log_softmax(-1) for logits in recorded)
        steering = (expert - anti_expert).to(scores.device, scores.dtype)
        return scores + self.weight * steering


def _request_expert_logits(module, args, kwargs):
    return args, {**kwargs, "output_expert_logits": True, "output_anti_expert_logits": True}


@contextlib.contextmanager
def expert_guidance(model, weight: float) -> Iterator[ExpertGuidanceLogitsProcessor]:
    """Connect an `ExpertGuidanceLogitsProcessor` to every forward of `model` (an Otter causal LM inserted with
    `expert_heads=True`) inside the block."""
    check_expert_weight("weight", weight)
    if getattr(model, "expert_head", None) is None:
        raise ValueError(
            "Expert steering needs expert heads: insert with `otter_hf.insert(base, expert_heads=True)` and train "
            "them with `OtterExpertTrainer`."
        )
    guidance = ExpertGuidanceLogitsProcessor(weight)
    request = model.register_forward_pre_hook(_request_expert_logits, with_kwargs=True)
    record = model.register_forward_hook(guidance.record_expert_logits)
    try:
        yield guidance
    finally:
        request.remove()
        record.remove()
