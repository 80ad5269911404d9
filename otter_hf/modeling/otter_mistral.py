"""Otter for Mistral checkpoints: `MistralForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama: the attention reads its sliding window from the config, for every layer; the inserted
heads slide alike.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import (
    MistralForCausalLM,
    MistralModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterMistralConfig(OtterConfigMixin, MistralConfig):
    model_type = "otter_mistral"
    base_model_type = "mistral"


class OtterMistralModel(OtterModelMixin, MistralModel):
    config_class = OtterMistralConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        sliding_window=lambda attention: getattr(attention.config, "sliding_window", None),
    )


class OtterMistralForCausalLMWithValueHead(OtterForCausalLMMixin, MistralForCausalLM):
    config_class = OtterMistralConfig
    backbone_class = OtterMistralModel


class OtterMistralForSequenceClassification(OtterForSequenceClassificationMixin, OtterMistralForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterMistralConfig",
    "OtterMistralModel",
    "OtterMistralForCausalLMWithValueHead",
    "OtterMistralForSequenceClassification",
]
