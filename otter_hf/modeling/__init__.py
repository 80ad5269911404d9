"""Otter configs and model classes, one module per architecture, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling_otter import OtterCausalLMOutputWithValue, is_inserted_parameter
from .otter_llama import OtterLlamaConfig, OtterLlamaForCausalLMWithValueHead, OtterLlamaModel
from .otter_mistral import OtterMistralConfig, OtterMistralForCausalLMWithValueHead, OtterMistralModel
from .otter_qwen2 import OtterQwen2Config, OtterQwen2ForCausalLMWithValueHead, OtterQwen2Model

# Base model_type -> the Otter causal LM built from it.
OTTER_CLASSES_BY_BASE_MODEL_TYPE = {
    model_class.config_class.base_model_type: model_class
    for model_class in (
        OtterLlamaForCausalLMWithValueHead,
        OtterQwen2ForCausalLMWithValueHead,
        OtterMistralForCausalLMWithValueHead,
    )
}

for _causal_lm in OTTER_CLASSES_BY_BASE_MODEL_TYPE.values():
    _config_class = _causal_lm.config_class
    AutoConfig.register(_config_class.model_type, _config_class)
    AutoModel.register(_config_class, _causal_lm.backbone_class)
    AutoModelForCausalLM.register(_config_class, _causal_lm)

__all__ = [
    "OTTER_CLASSES_BY_BASE_MODEL_TYPE",
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
    "is_inserted_parameter",
]
