"""Otter for Qwen2 checkpoints: `Qwen2ForCausalLM` with parameters inserted into every layer."""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import OtterDecoderLayerMixin, OtterForCausalLMMixin, OtterModelMixin


@strict
class OtterQwen2Config(OtterConfigMixin, Qwen2Config):
    model_type = "otter_qwen2"
    base_model_type = "qwen2"


class OtterQwen2DecoderLayer(OtterDecoderLayerMixin, Qwen2DecoderLayer):
    rotary_fn = staticmethod(apply_rotary_pos_emb)
    eager_attention_fn = staticmethod(eager_attention_forward)


class OtterQwen2Model(OtterModelMixin, Qwen2Model):
    config_class = OtterQwen2Config
    decoder_layer_class = OtterQwen2DecoderLayer
    rotary_embedding_class = Qwen2RotaryEmbedding


class OtterQwen2ForCausalLMWithValueHead(OtterForCausalLMMixin, Qwen2ForCausalLM):
    config_class = OtterQwen2Config
    backbone_class = OtterQwen2Model


__all__ = [
    "OtterQwen2Config",
    "OtterQwen2DecoderLayer",
    "OtterQwen2Model",
    "OtterQwen2ForCausalLMWithValueHead",
]
