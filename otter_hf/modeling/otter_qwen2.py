"""Otter for Qwen2 checkpoints: `Qwen2ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view."""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2ForCausalLM,
    Qwen2Model,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterQwen2Config(OtterConfigMixin, Qwen2Config):
    model_type = "otter_qwen2"
    base_model_type = "qwen2"


class OtterQwen2Model(OtterModelMixin, Qwen2Model):
    config_class = OtterQwen2Config
    otter_layout = OtterLayout(eager_attention_fn=eager_attention_forward)


class OtterQwen2ForCausalLMWithValueHead(OtterForCausalLMMixin, Qwen2ForCausalLM):
    config_class = OtterQwen2Config
    backbone_class = OtterQwen2Model


class OtterQwen2ForSequenceClassification(OtterForSequenceClassificationMixin, OtterQwen2ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterQwen2Config",
    "OtterQwen2Model",
    "OtterQwen2ForCausalLMWithValueHead",
    "OtterQwen2ForSequenceClassification",
]
