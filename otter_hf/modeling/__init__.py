"""Otter configs and model classes, one module per architecture, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .inserted_heads import INSERTED_HEADS
from .modeling_otter import OtterCausalLMOutputWithValue, is_inserted_parameter
from .otter_gemma3 import (
    OtterGemma3ForCausalLMWithValueHead,
    OtterGemma3ForSequenceClassification,
    OtterGemma3TextConfig,
    OtterGemma3TextModel,
)
from .otter_gpt2 import (
    OtterGPT2Config,
    OtterGPT2ForCausalLMWithValueHead,
    OtterGPT2ForSequenceClassification,
    OtterGPT2Model,
)
from .otter_llama import (
    OtterLlamaConfig,
    OtterLlamaForCausalLMWithValueHead,
    OtterLlamaForSequenceClassification,
    OtterLlamaModel,
)
from .otter_mistral import (
    OtterMistralConfig,
    OtterMistralForCausalLMWithValueHead,
    OtterMistralForSequenceClassification,
    OtterMistralModel,
)
from .otter_qwen2 import (
    OtterQwen2Config,
    OtterQwen2ForCausalLMWithValueHead,
    OtterQwen2ForSequenceClassification,
    OtterQwen2Model,
)
from .otter_qwen3 import (
    OtterQwen3Config,
    OtterQwen3ForCausalLMWithValueHead,
    OtterQwen3ForSequenceClassification,
    OtterQwen3Model,
)
from .sequence_classification import sequence_classification_view

# Each supported architecture: its Otter causal LM and sequence-classification view, defined in one module.
OTTER_ARCHITECTURES = (
    (OtterLlamaForCausalLMWithValueHead, OtterLlamaForSequenceClassification),
    (OtterQwen2ForCausalLMWithValueHead, OtterQwen2ForSequenceClassification),
    (OtterMistralForCausalLMWithValueHead, OtterMistralForSequenceClassification),
    (OtterQwen3ForCausalLMWithValueHead, OtterQwen3ForSequenceClassification),
    (OtterGemma3ForCausalLMWithValueHead, OtterGemma3ForSequenceClassification),
    (OtterGPT2ForCausalLMWithValueHead, OtterGPT2ForSequenceClassification),
)

# Base model_type -> the Otter causal LM built from it.
OTTER_CLASSES_BY_BASE_MODEL_TYPE = {
    causal_lm.config_class.base_model_type: causal_lm for causal_lm, _ in OTTER_ARCHITECTURES
}

for _causal_lm, _view in OTTER_ARCHITECTURES:
    _config_class = _causal_lm.config_class
    AutoConfig.register(_config_class.model_type, _config_class)
    AutoModel.register(_config_class, _causal_lm.backbone_class)
    AutoModelForCausalLM.register(_config_class, _causal_lm)
    AutoModelForSequenceClassification.register(_config_class, _view)
    # Saved checkpoints carry the code of these classes and an `auto_map`, for trust_remote_code without otter_hf.
    _config_class.register_for_auto_class()
    _causal_lm.auto_map_classes = {
        "AutoModel": _causal_lm.backbone_class,
        "AutoModelForCausalLM": _causal_lm,
        "AutoModelForSequenceClassification": _view,
    }
    for _auto_class, _model_class in _causal_lm.auto_map_classes.items():
        _model_class.register_for_auto_class(_auto_class)

__all__ = [
    "INSERTED_HEADS",
    "OTTER_ARCHITECTURES",
    "OTTER_CLASSES_BY_BASE_MODEL_TYPE",
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
    "is_inserted_parameter",
    "sequence_classification_view",
]
