"""Trainers for Otter models: reward modelling (TRL's RewardTrainer) and prefix/step value regression."""

from .reward_trainer import OtterRewardConfig, OtterRewardTrainer
from .value_trainer import DataCollatorForValueRegression, OtterValueConfig, OtterValueTrainer

__all__ = [
    "DataCollatorForValueRegression",
    "OtterRewardConfig",
    "OtterRewardTrainer",
    "OtterValueConfig",
    "OtterValueTrainer",
]

from .draft_trainer import DataCollatorForDraftHeads, OtterDraftConfig, OtterDraftTrainer, build_self_distillation_dataset

__all__ += ["DataCollatorForDraftHeads", "OtterDraftConfig", "OtterDraftTrainer", "build_self_distillation_dataset"]
