"""Otter for Qwen2 checkpoints: `Qwen2ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view."""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2MLP,
    Qwen2Model,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import OtterDecoderLayerMixin, OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


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
    # The base modules this class was written for, by their path in a `Qwen2ForCausalLM`.
    written_for = {
        "model.layers.0": Qwen2DecoderLayer,
        "model.layers.0.self_attn": Qwen2Attention,
        "model.layers.0.mlp": Qwen2MLP,
        "model.layers.0.input_layernorm": Qwen2RMSNorm,
        "model.norm": Qwen2RMSNorm,
    }


class OtterQwen2ForSequenceClassification(OtterForSequenceClassificationMixin, OtterQwen2ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterQwen2Config",
    "OtterQwen2DecoderLayer",
    "OtterQwen2Model",
    "OtterQwen2ForCausalLMWithValueHead",
    "OtterQwen2ForSequenceClassification",
]
