"""Trainers for Otter models, one `*_config.py` / `*_trainer.py` pair each as in TRL: reward modelling (TRL's
RewardTrainer), the token-level reward head (GenARM), prefix/step value regression, draft heads, DExperts-style
expert heads, and online RL with the Otter reward read from the policy's own frozen base (TRL's GRPOTrainer).

`base_config.py` / `base_trainer.py` hold what the per-token trainers (value, token reward, draft) share, `utils.py`
the model and dataset checks every trainer runs, `safeguards.py` the stop on a non-finite gradient,
`distributed.py` what every trainer changes for multi-process runs and small checkpoints, `trainer_state.py` the
optimizer, scheduler and generator states those checkpoints hold as safetensors.
"""

from ..data.self_distillation import build_self_distillation_dataset
from .draft_config import OtterDraftConfig
from .draft_trainer import DataCollatorForDraftHeads, OtterDraftTrainer, fit_draft_vocabulary
from .expert_config import OtterExpertConfig
from .expert_trainer import DataCollatorForExpertHeads, OtterExpertTrainer, expert_corpora
from .grpo_config import OtterGRPOConfig
from .grpo_trainer import OtterGRPOTrainer
from .reward_config import OtterRewardConfig
from .reward_trainer import OtterRewardTrainer
from .token_reward_config import OtterTokenRewardConfig
from .token_reward_trainer import OtterTokenRewardTrainer, token_reward_log_probs
from .value_config import OtterValueConfig
from .value_trainer import DataCollatorForValueRegression, OtterValueTrainer

__all__ = [
    "DataCollatorForDraftHeads",
    "DataCollatorForExpertHeads",
    "DataCollatorForValueRegression",
    "OtterDraftConfig",
    "OtterDraftTrainer",
    "OtterExpertConfig",
    "OtterExpertTrainer",
    "OtterGRPOConfig",
    "OtterGRPOTrainer",
    "OtterRewardConfig",
    "OtterRewardTrainer",
    "OtterTokenRewardConfig",
    "OtterTokenRewardTrainer",
    "OtterValueConfig",
    "OtterValueTrainer",
    # The data builder lives in otter_hf.data; importable from here too, where draft training starts.
    "build_self_distillation_dataset",
    "expert_corpora",
    "fit_draft_vocabulary",
    "token_reward_log_probs",
]
