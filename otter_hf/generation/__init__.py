"""Decoding with the Otter signal (ARGS reward guidance from the in-model value head, DExperts-style steering by
the expert heads) and with the draft heads (speculative decoding)."""

from ..modeling.expert_guidance import ExpertGuidanceLogitsProcessor, expert_guidance
from ..modeling.reward_guided import reward_guided_generate
from .logits_process import OtterRewardLogitsProcessor

__all__ = ["ExpertGuidanceLogitsProcessor", "OtterRewardLogitsProcessor", "expert_guidance", "reward_guided_generate"]

from .draft_calibration import DraftConfidenceCalibration, calibrate_draft_confidence
from .speculative import SpeculativeDecoderOnlyOutput, speculative_generate

__all__ += [
    "DraftConfidenceCalibration",
    "SpeculativeDecoderOnlyOutput",
    "calibrate_draft_confidence",
    "speculative_generate",
]
