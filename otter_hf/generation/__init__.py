"""Decoding with the Otter signal: ARGS reward guidance from the in-model value head."""

from .logits_process import OtterRewardLogitsProcessor
from .reward_guided import reward_guided_generate

__all__ = ["OtterRewardLogitsProcessor", "reward_guided_generate"]

from .speculative import SpeculativeDecoderOnlyOutput, speculative_generate

__all__ += ["SpeculativeDecoderOnlyOutput", "speculative_generate"]
