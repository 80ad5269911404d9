"""Otter for Mistral checkpoints: `MistralForCausalLM` with parameters inserted into every layer."""

from huggingface_hub.dataclasses import strict
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralModel,
    MistralRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import OtterDecoderLayerMixin, OtterForCausalLMMixin, OtterModelMixin


@strict
class OtterMistralConfig(OtterConfigMixin, MistralConfig):
    model_type = "otter_mistral"
    base_model_type = "mistral"


class OtterMistralDecoderLayer(OtterDecoderLayerMixin, MistralDecoderLayer):
    rotary_fn = staticmethod(apply_rotary_pos_emb)
    eager_attention_fn = staticmethod(eager_attention_forward)


class OtterMistralModel(OtterModelMixin, MistralModel):
    config_class = OtterMistralConfig
    decoder_layer_class = OtterMistralDecoderLayer
    rotary_embedding_class = MistralRotaryEmbedding


class OtterMistralForCausalLMWithValueHead(OtterForCausalLMMixin, MistralForCausalLM):
    config_class = OtterMistralConfig
    backbone_class = OtterMistralModel


__all__ = [
    "OtterMistralConfig",
    "OtterMistralDecoderLayer",
    "OtterMistralModel",
    "OtterMistralForCausalLMWithValueHead",
]
