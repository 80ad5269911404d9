"""Otter configs and model classes, one module per architecture, registered with the Auto classes.

`ARCHITECTURE_MODULES` is the one list of supported architectures: the Auto classes, `otter_hf.insert`, the
exports of this package and of `otter_hf`, the CLI's help and the tests' parametrisation all read it.
"""

from transformers import AutoConfig, AutoModelForImageTextToText

from . import (
    otter_deepseek_v2,
    otter_deepseek_v3,
    otter_gemma3,
    otter_gemma3_vlm,
    otter_gemma4,
    otter_glm4_moe,
    otter_gpt2,
    otter_gpt_oss,
    otter_granite,
    otter_granitemoe,
    otter_llama,
    otter_llama4_text,
    otter_mistral,
    otter_mixtral,
    otter_olmo2,
    otter_olmo3,
    otter_olmoe,
    otter_phi3,
    otter_qwen2,
    otter_qwen2_moe,
    otter_qwen3,
    otter_qwen3_5,
    otter_qwen3_5_moe,
    otter_qwen3_moe,
    otter_qwen3_next,
    otter_qwen3_vl,
    otter_smollm3,
)
from .derived_layout import register_with_auto_classes
from .inserted_heads import INSERTED_HEADS, PEFT_EXCLUDE_MODULES
from .modeling_otter import OtterCausalLMOutputWithValue, OtterForCausalLMMixin, is_inserted_parameter
from .sequence_classification import OtterForSequenceClassificationMixin
from .vision_language import OtterForConditionalGenerationMixin

# Each supported architecture: a module defining its config, backbone, Otter causal LM and sequence-classification
# view (see README.md beside this file). Adding an architecture adds its module here.
ARCHITECTURE_MODULES = (
    otter_llama,
    otter_qwen2,
    otter_mistral,
    otter_qwen3,
    otter_gemma3,
    otter_gpt2,
    otter_phi3,
    otter_granite,
    otter_smollm3,
    otter_olmo3,
    otter_olmo2,
    otter_qwen3_moe,
    otter_mixtral,
    otter_qwen2_moe,
    otter_gpt_oss,
    otter_glm4_moe,
    otter_olmoe,
    otter_granitemoe,
    otter_qwen3_5,
    otter_qwen3_5_moe,
    otter_qwen3_next,
    otter_deepseek_v3,
    otter_deepseek_v2,
    otter_llama4_text,
    otter_gemma4,
)


def _causal_lm_and_view(module) -> tuple[type, type]:
    classes = [getattr(module, name) for name in module.__all__]
    view = next(cls for cls in classes if issubclass(cls, OtterForSequenceClassificationMixin))
    causal_lm = next(
        cls
        for cls in classes
        if issubclass(cls, OtterForCausalLMMixin) and not issubclass(cls, OtterForSequenceClassificationMixin)
    )
    return causal_lm, view


# Each supported architecture's Otter causal LM and sequence-classification view.
OTTER_ARCHITECTURES = tuple(_causal_lm_and_view(module) for module in ARCHITECTURE_MODULES)

# Base model_type -> the Otter causal LM built from it.
OTTER_CLASSES_BY_BASE_MODEL_TYPE = {
    causal_lm.config_class.base_model_type: causal_lm for causal_lm, _ in OTTER_ARCHITECTURES
}
# What help texts and error messages list: the `model_type` of every base Otter inserts into.
SUPPORTED_BASE_MODEL_TYPES = tuple(sorted(OTTER_CLASSES_BY_BASE_MODEL_TYPE))
_VIEWS_BY_CAUSAL_LM = dict(OTTER_ARCHITECTURES)

for _causal_lm, _view in OTTER_ARCHITECTURES:
    register_with_auto_classes(_causal_lm, _view)


# Each supported vision-language architecture: a module defining the Otter text config and language model, the
# vision-language config and the `...ForConditionalGeneration` class (see vision_language.py).
VISION_LANGUAGE_MODULES = (otter_qwen3_vl, otter_gemma3_vlm)


def _conditional_generation_class(module) -> type:
    return next(
        cls
        for cls in (getattr(module, name) for name in module.__all__)
        if isinstance(cls, type) and issubclass(cls, OtterForConditionalGenerationMixin)
    )


# Each supported vision-language architecture's Otter `...ForConditionalGeneration`.
OTTER_VISION_LANGUAGE_ARCHITECTURES = tuple(_conditional_generation_class(module) for module in VISION_LANGUAGE_MODULES)

for _conditional_generation in OTTER_VISION_LANGUAGE_ARCHITECTURES:
    _config_class = _conditional_generation.config_class
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForImageTextToText.register(_config_class, _conditional_generation, exist_ok=True)
    OTTER_CLASSES_BY_BASE_MODEL_TYPE[_config_class.base_model_type] = _conditional_generation
    _config_class.register_for_auto_class()
    _conditional_generation.auto_map_classes = {"AutoModelForImageTextToText": _conditional_generation}
    _conditional_generation.register_for_auto_class("AutoModelForImageTextToText")
SUPPORTED_BASE_MODEL_TYPES = tuple(sorted(OTTER_CLASSES_BY_BASE_MODEL_TYPE))


def sequence_classification_view(model: OtterForCausalLMMixin):
    """The sequence-classification view of a loaded Otter causal LM, sharing its parameters.

    Use it to hand an Otter model object to code that expects a reward model, such as `trl.RewardTrainer`
    or the `reward_funcs` of `trl.GRPOTrainer`.
    """
    if isinstance(model, OtterForSequenceClassificationMixin):
        return model
    # A derived architecture's view is in its Auto classes, as every architecture's is.
    view = getattr(type(model), "auto_map_classes", {}).get("AutoModelForSequenceClassification")
    if not isinstance(model, OtterForCausalLMMixin) or view is None:
        supported = ", ".join(sorted(causal_lm.__name__ for causal_lm in _VIEWS_BY_CAUSAL_LM))
        raise TypeError(f"Expected an Otter causal LM with value head ({supported}); got {type(model).__name__}.")
    return view.from_causal_lm(model)


# Every architecture's classes, exported by name: `from otter_hf.modeling import OtterLlamaConfig`.
ARCHITECTURE_CLASS_NAMES = tuple(
    name for module in ARCHITECTURE_MODULES + VISION_LANGUAGE_MODULES for name in module.__all__
)
globals().update(
    {
        name: getattr(module, name)
        for module in ARCHITECTURE_MODULES + VISION_LANGUAGE_MODULES
        for name in module.__all__
    }
)

__all__ = [
    "PEFT_EXCLUDE_MODULES",
    "ARCHITECTURE_MODULES",
    "INSERTED_HEADS",
    "OTTER_ARCHITECTURES",
    "OTTER_CLASSES_BY_BASE_MODEL_TYPE",
    "OTTER_VISION_LANGUAGE_ARCHITECTURES",
    "VISION_LANGUAGE_MODULES",
    "SUPPORTED_BASE_MODEL_TYPES",
    "OtterCausalLMOutputWithValue",
    "is_inserted_parameter",
    "sequence_classification_view",
    *ARCHITECTURE_CLASS_NAMES,
]
