"""otter_hf: Otter parameter insertion as native Hugging Face transformers model classes.

Importing the package registers the Otter configs and models with AutoConfig, AutoModel and
AutoModelForCausalLM.
"""

from .insertion import insert, load_otter
from .modeling import (
    OtterCausalLMOutputWithValue,
    OtterLlamaConfig,
    OtterLlamaForCausalLMWithValueHead,
    OtterLlamaModel,
    OtterMistralConfig,
    OtterMistralForCausalLMWithValueHead,
    OtterMistralModel,
    OtterQwen2Config,
    OtterQwen2ForCausalLMWithValueHead,
    OtterQwen2Model,
)

__version__ = "0.1.0"

__all__ = [
    "OtterCausalLMOutputWithValue",
    "OtterLlamaConfig",
    "OtterLlamaForCausalLMWithValueHead",
    "OtterLlamaModel",
    "OtterMistralConfig",
    "OtterMistralForCausalLMWithValueHead",
    "OtterMistralModel",
    "OtterQwen2Config",
    "OtterQwen2ForCausalLMWithValueHead",
    "OtterQwen2Model",
    "insert",
    "load_otter",
]
