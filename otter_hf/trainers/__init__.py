"""Trainers for Otter models: reward modelling (TRL's RewardTrainer), the token-level reward head (GenARM),
prefix/step value regression and draft heads."""

from .reward_trainer import OtterRewardConfig, OtterRewardTrainer
from .token_reward_trainer import OtterTokenRewardConfig, OtterTokenRewardTrainer, token_reward_log_probs
from .value_trainer import DataCollatorForValueRegression, OtterValueConfig, OtterValueTrainer

__all__ = [
    "DataCollatorForValueRegression",
    "OtterRewardConfig",
    "OtterRewardTrainer",
    "OtterTokenRewardConfig",
    "OtterTokenRewardTrainer",
    "OtterValueConfig",
    "OtterValueTrainer",
    "token_reward_log_probs",
]

from .draft_trainer import (
    DataCollatorForDraftHeads,
    OtterDraftConfig,
    OtterDraftTrainer,
    build_self_distillation_dataset,
    fit_draft_vocabulary,
)

__all__ += [
    "DataCollatorForDraftHeads",
    "OtterDraftConfig",
    "OtterDraftTrainer",
    "build_self_distillation_dataset",
    "fit_draft_vocabulary",
]
