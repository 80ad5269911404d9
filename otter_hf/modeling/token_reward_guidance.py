"""Guided decoding with the token-level reward head, in the forward that computes the original logits.

`model.generate(**inputs, token_reward_weight=alpha)` decodes from `logits + alpha * log_softmax(reward logits)`
(GenARM's guided policy, with `alpha = 1 / beta`). transformers hands a logits processor only `(input_ids,
scores)`, so for the length of one `generate()` call two hooks on the model connect them: a forward pre-hook asks
every forward for `token_reward_logits`, and a forward hook hands the processor the reward logits of the forward
whose logits it is about to process. No second forward runs and nothing else in the decoding loop changes, so
every decoding strategy of transformers (greedy, sampling and its warpers, beam search, streamers) applies.

This file imports only torch and transformers, so it ships with a checkpoint as remote code.
"""

import contextlib
from collections.abc import Iterator

import torch
from transformers import LogitsProcessor


class TokenRewardGuidanceLogitsProcessor(LogitsProcessor):
    r"""
    Adds `weight * log_softmax(token_reward_logits)` of the model's latest forward to the scores.

    Built and connected by `model.generate(token_reward_weight=...)`; generate() places it after its own
    processors (repetition penalty, ...) and before the sampling warpers (temperature, top-k, top-p), so the
    warpers act on the guided scores.
    """

    def __init__(self, weight: float):
        self.weight = float(weight)
        self._reward_logits: torch.Tensor | None = None

    def record_reward_logits(self, module, args, output) -> None:
        self._reward_logits = output.token_reward_logits[:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        reward_logits, self._reward_logits = self._reward_logits, None
        if reward_logits is None or reward_logits.shape != scores.shape:
            raise RuntimeError(
                "Token-reward guidance adds the reward logits of the forward whose scores it processes; it runs "
                "inside `model.generate(token_reward_weight=...)`, with decoding strategies that run one forward "
                "per step (greedy, sampling, beam search)."
            )
        reward_log_probs = torch.log_softmax(reward_logits.to(torch.float32), dim=-1).to(scores.device)
        return scores + self.weight * reward_log_probs.to(scores.dtype)


def _request_token_reward_logits(module, args, kwargs):
    return args, {**kwargs, "output_token_reward_logits": True}


@contextlib.contextmanager
def token_reward_guidance(model, weight: float) -> Iterator[TokenRewardGuidanceLogitsProcessor]:
    """Connect a `TokenRewardGuidanceLogitsProcessor` to every forward of `model` inside the block."""
    guidance = TokenRewardGuidanceLogitsProcessor(weight)
    request = model.register_forward_pre_hook(_request_token_reward_logits, with_kwargs=True)
    record = model.register_forward_hook(guidance.record_reward_logits)
    try:
        yield guidance
    finally:
        request.remove()
        record.remove()
