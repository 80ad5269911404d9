"""otter_hf: Otter parameter insertion as native Hugging Face transformers model classes.

Importing the package registers the Otter configs and models with AutoConfig, AutoModel and
AutoModelForCausalLM. Every supported architecture's classes are exported here as in `otter_hf.modeling`, from its
one list, `otter_hf.modeling.ARCHITECTURE_MODULES`.
"""

from . import modeling
from .data import fit_preference_pairs, load_hh_rlhf, load_preference_dataset, split_hh_rlhf
from .generation import OtterRewardLogitsProcessor, reward_guided_generate
from .lifecycle import insert, load_otter, push_to_hub
from .modeling import PEFT_EXCLUDE_MODULES, OtterCausalLMOutputWithValue, sequence_classification_view
from .trainers import (
    OtterDraftConfig,
    OtterDraftTrainer,
    OtterExpertConfig,
    OtterExpertTrainer,
    OtterGRPOConfig,
    OtterGRPOTrainer,
    OtterRewardConfig,
    OtterRewardTrainer,
    OtterTokenRewardConfig,
    OtterTokenRewardTrainer,
    OtterValueConfig,
    OtterValueTrainer,
)

__version__ = "0.1.0"

globals().update({name: getattr(modeling, name) for name in modeling.ARCHITECTURE_CLASS_NAMES})

__all__ = [
    "PEFT_EXCLUDE_MODULES",
    "OtterCausalLMOutputWithValue",
    "OtterDraftConfig",
    "OtterDraftTrainer",
    "OtterExpertConfig",
    "OtterExpertTrainer",
    "OtterGRPOConfig",
    "OtterGRPOTrainer",
    "OtterRewardConfig",
    "OtterRewardLogitsProcessor",
    "OtterRewardTrainer",
    "OtterTokenRewardConfig",
    "OtterTokenRewardTrainer",
    "OtterValueConfig",
    "OtterValueTrainer",
    "insert",
    "load_otter",
    "push_to_hub",
    "fit_preference_pairs",
    "load_hh_rlhf",
    "load_preference_dataset",
    "split_hh_rlhf",
    "reward_guided_generate",
    "sequence_classification_view",
    *modeling.ARCHITECTURE_CLASS_NAMES,
]
