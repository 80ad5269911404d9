"""Otter for Llama checkpoints: `LlamaForCausalLM` with parameters inserted into every layer, and its
sequence-classification view."""

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterLlamaConfig(OtterConfigMixin, LlamaConfig):
    model_type = "otter_llama"
    base_model_type = "llama"


class OtterLlamaModel(OtterModelMixin, LlamaModel):
    config_class = OtterLlamaConfig
    otter_layout = OtterLayout(eager_attention_fn=eager_attention_forward)


class OtterLlamaForCausalLMWithValueHead(OtterForCausalLMMixin, LlamaForCausalLM):
    config_class = OtterLlamaConfig
    backbone_class = OtterLlamaModel


class OtterLlamaForSequenceClassification(OtterForSequenceClassificationMixin, OtterLlamaForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterLlamaConfig",
    "OtterLlamaModel",
    "OtterLlamaForCausalLMWithValueHead",
    "OtterLlamaForSequenceClassification",
]
