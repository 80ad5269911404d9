"""Otter for Qwen3 checkpoints: `Qwen3ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama: every query and key head is RMS-normalised (`q_norm`, `k_norm`) before the rotary
embedding. The inserted heads go through the same frozen norms, so a copied head attends as its source does.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3MLP,
    Qwen3Model,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import OtterDecoderLayerMixin, OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterQwen3Config(OtterConfigMixin, Qwen3Config):
    model_type = "otter_qwen3"
    base_model_type = "qwen3"


class OtterQwen3DecoderLayer(OtterDecoderLayerMixin, Qwen3DecoderLayer):
    rotary_fn = staticmethod(apply_rotary_pos_emb)
    eager_attention_fn = staticmethod(eager_attention_forward)

    def project_heads(self, normed):
        # As Qwen3Attention: each head is normalised before the head axis moves forward.
        attention = self.self_attn
        hidden_shape = (*normed.shape[:-1], -1, attention.head_dim)
        query = attention.q_norm(attention.q_proj(normed).view(hidden_shape)).transpose(1, 2)
        key = attention.k_norm(attention.k_proj(normed).view(hidden_shape)).transpose(1, 2)
        value = attention.v_proj(normed).view(hidden_shape).transpose(1, 2)
        return query, key, value

    def normalize_query_key(self, query, key):
        return self.self_attn.q_norm(query), self.self_attn.k_norm(key)


class OtterQwen3Model(OtterModelMixin, Qwen3Model):
    config_class = OtterQwen3Config
    decoder_layer_class = OtterQwen3DecoderLayer
    rotary_embedding_class = Qwen3RotaryEmbedding


class OtterQwen3ForCausalLMWithValueHead(OtterForCausalLMMixin, Qwen3ForCausalLM):
    config_class = OtterQwen3Config
    backbone_class = OtterQwen3Model
    # The base modules this class was written for, by their path in a `Qwen3ForCausalLM`.
    written_for = {
        "model.layers.0": Qwen3DecoderLayer,
        "model.layers.0.self_attn": Qwen3Attention,
        "model.layers.0.self_attn.q_norm": Qwen3RMSNorm,
        "model.layers.0.mlp": Qwen3MLP,
        "model.layers.0.input_layernorm": Qwen3RMSNorm,
        "model.norm": Qwen3RMSNorm,
    }


class OtterQwen3ForSequenceClassification(OtterForSequenceClassificationMixin, OtterQwen3ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterQwen3Config",
    "OtterQwen3DecoderLayer",
    "OtterQwen3Model",
    "OtterQwen3ForCausalLMWithValueHead",
    "OtterQwen3ForSequenceClassification",
]
