"""otter_hf: Otter parameter insertion as native Hugging Face transformers model classes.

Importing the package registers the Otter configs and models with AutoConfig, AutoModel and
AutoModelForCausalLM.
"""

from .data import fit_preference_pairs, load_hh_rlhf, load_preference_dataset, split_hh_rlhf
from .generation import OtterRewardLogitsProcessor, reward_guided_generate
from .hub import push_to_hub
from .insertion import insert, load_otter
from .modeling import (
    OtterCausalLMOutputWithValue,
    OtterGemma3ForCausalLMWithValueHead,
    OtterGemma3ForSequenceClassification,
    OtterGemma3TextConfig,
    OtterGemma3TextModel,
    OtterGPT2Config,
    OtterGPT2ForCausalLMWithValueHead,
    OtterGPT2ForSequenceClassification,
    OtterGPT2Model,
    OtterLlamaConfig,
    OtterLlamaForCausalLMWithValueHead,
    OtterLlamaForSequenceClassification,
    OtterLlamaModel,
    OtterMistralConfig,
    OtterMistralForCausalLMWithValueHead,
    OtterMistralForSequenceClassification,
    OtterMistralModel,
    OtterQwen2Config,
    OtterQwen2ForCausalLMWithValueHead,
    OtterQwen2ForSequenceClassification,
    OtterQwen2Model,
    OtterQwen3Config,
    OtterQwen3ForCausalLMWithValueHead,
    OtterQwen3ForSequenceClassification,
    OtterQwen3Model,
    sequence_classification_view,
)
from .trainers import (
    OtterRewardConfig,
    OtterRewardTrainer,
    OtterTokenRewardConfig,
    OtterTokenRewardTrainer,
    OtterValueConfig,
    OtterValueTrainer,
)

__version__ = "0.1.0"

__all__ = [
    "OtterCausalLMOutputWithValue",
    "OtterGemma3ForCausalLMWithValueHead",
    "OtterGemma3ForSequenceClassification",
    "OtterGemma3TextConfig",
    "OtterGemma3TextModel",
    "OtterGPT2Config",
    "OtterGPT2ForCausalLMWithValueHead",
    "OtterGPT2ForSequenceClassification",
    "OtterGPT2Model",
    "OtterLlamaConfig",
    "OtterLlamaForCausalLMWithValueHead",
    "OtterLlamaForSequenceClassification",
    "OtterLlamaModel",
    "OtterMistralConfig",
    "OtterMistralForCausalLMWithValueHead",
    "OtterMistralForSequenceClassification",
    "OtterMistralModel",
    "OtterQwen2Config",
    "OtterQwen2ForCausalLMWithValueHead",
    "OtterQwen2ForSequenceClassification",
    "OtterQwen2Model",
    "OtterQwen3Config",
    "OtterQwen3ForCausalLMWithValueHead",
    "OtterQwen3ForSequenceClassification",
    "OtterQwen3Model",
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
]
