"""Configuration of `OtterRewardTrainer`: TRL's `RewardConfig` with defaults suited to a frozen base."""

from dataclasses import dataclass, field

import torch
from trl import RewardConfig


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class OtterRewardConfig(RewardConfig):
    r"""
    Configuration for [`OtterRewardTrainer`]: every [`~trl.RewardConfig`] option, with three defaults changed.

    bf16 (`bool`, *optional*):
        Whether to train in bf16 mixed precision. Defaults to `True` only where a CUDA device supports bf16 (TRL
        defaults to `True` everywhere, which fails on a CPU). The base model's weights are never updated either way.
    train_sampling_strategy (`str`, *optional*, defaults to `"group_by_length"`):
        Batches pairs of similar length (by the longer of chosen and rejected), so a step does not pad every
        sequence to the longest dialogue in a random batch; on HH-RLHF that halves the tokens a step computes.
        `"random"` gives TRL's default order.
    activation_checkpointing (`bool`, *optional*, defaults to `False`):
        TRL turns it on by default (as `gradient_checkpointing`, the deprecated name, which still works). An Otter
        model's frozen base runs without autograd and keeps no activations; only the narrow inserted stream builds
        a graph, so there is nothing worth recomputing: off, a step costs about one base forward plus the inserted
        parameters' own work.
    """

    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; defaults to True only where a CUDA device supports bf16."},
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Sampler for training; 'group_by_length' batches pairs of similar length."},
    )
    # Unset rather than TRL's True: with `activation_checkpointing` unset too, transformers turns checkpointing off
    # without a deprecation warning, while a user's own `gradient_checkpointing=True` still applies.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated name of `activation_checkpointing`; both unset: off."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = _bf16_available()
        super().__post_init__()
