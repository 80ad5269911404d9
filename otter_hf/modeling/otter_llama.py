"""Otter for Llama checkpoints: `LlamaForCausalLM` with parameters inserted into every layer, and its
sequence-classification view."""

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import OtterDecoderLayerMixin, OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterLlamaConfig(OtterConfigMixin, LlamaConfig):
    model_type = "otter_llama"
    base_model_type = "llama"


class OtterLlamaDecoderLayer(OtterDecoderLayerMixin, LlamaDecoderLayer):
    rotary_fn = staticmethod(apply_rotary_pos_emb)
    eager_attention_fn = staticmethod(eager_attention_forward)


class OtterLlamaModel(OtterModelMixin, LlamaModel):
    config_class = OtterLlamaConfig
    decoder_layer_class = OtterLlamaDecoderLayer
    rotary_embedding_class = LlamaRotaryEmbedding


class OtterLlamaForCausalLMWithValueHead(OtterForCausalLMMixin, LlamaForCausalLM):
    config_class = OtterLlamaConfig
    backbone_class = OtterLlamaModel
    # The base modules this class was written for, by their path in a `LlamaForCausalLM`.
    written_for = {
        "model.layers.0": LlamaDecoderLayer,
        "model.layers.0.self_attn": LlamaAttention,
        "model.layers.0.mlp": LlamaMLP,
        "model.layers.0.input_layernorm": LlamaRMSNorm,
        "model.norm": LlamaRMSNorm,
    }


class OtterLlamaForSequenceClassification(OtterForSequenceClassificationMixin, OtterLlamaForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterLlamaConfig",
    "OtterLlamaDecoderLayer",
    "OtterLlamaModel",
    "OtterLlamaForCausalLMWithValueHead",
    "OtterLlamaForSequenceClassification",
]
