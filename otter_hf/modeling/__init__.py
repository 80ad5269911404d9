"""Otter configs and model classes, one module per architecture, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .modeling_otter import OtterCausalLMOutputWithValue, is_inserted_parameter
from .otter_llama import OtterLlamaConfig, OtterLlamaForCausalLMWithValueHead, OtterLlamaModel
from .otter_mistral import OtterMistralConfig, OtterMistralForCausalLMWithValueHead, OtterMistralModel
from .otter_qwen2 import OtterQwen2Config, OtterQwen2ForCausalLMWithValueHead, OtterQwen2Model
from .sequence_classification import (
    SEQUENCE_CLASSIFICATION_CLASS_BY_CAUSAL_LM,
    OtterLlamaForSequenceClassification,
    OtterMistralForSequenceClassification,
    OtterQwen2ForSequenceClassification,
    sequence_classification_view,
)

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
    AutoModelForSequenceClassification.register(_config_class, SEQUENCE_CLASSIFICATION_CLASS_BY_CAUSAL_LM[_causal_lm])
    # Saved checkpoints carry the code of these classes and an `auto_map`, for trust_remote_code without otter_hf.
    _config_class.register_for_auto_class()
    _causal_lm.auto_map_classes = {
        "AutoModel": _causal_lm.backbone_class,
        "AutoModelForCausalLM": _causal_lm,
        "AutoModelForSequenceClassification": SEQUENCE_CLASSIFICATION_CLASS_BY_CAUSAL_LM[_causal_lm],
    }
    for _auto_class, _model_class in _causal_lm.auto_map_classes.items():
        _model_class.register_for_auto_class(_auto_class)

__all__ = [
    "OTTER_CLASSES_BY_BASE_MODEL_TYPE",
    "OtterCausalLMOutputWithValue",
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
    "is_inserted_parameter",
    "sequence_classification_view",
]
