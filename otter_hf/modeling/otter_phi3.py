"""Otter for Phi-3 checkpoints: `Phi3ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared in the layout below: query, key and value come from one fused `qkv_proj`,
gate and up from one fused `gate_up_proj` (copy-initialisation reads their row blocks); the activation is
`mlp.activation_fn`; the sliding window comes from the config; the rotary embedding may cover only part of each
head (`partial_rotary_factor`), which the inserted heads' `HalfRotation` follows from the tables' width. The
capture points are Llama's: the original heads enter `o_proj`, the original units `down_proj`.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.phi3.configuration_phi3 import Phi3Config
from transformers.models.phi3.modeling_phi3 import (
    Phi3ForCausalLM,
    Phi3Model,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterPhi3Config(OtterConfigMixin, Phi3Config):
    model_type = "otter_phi3"
    base_model_type = "phi3"


def phi3_copy_source(layer: nn.Module, role: str):
    # Phi-3's projections have no bias; the fused ones are read by row block.
    attention, mlp = layer.self_attn, layer.mlp
    query_size = attention.config.num_attention_heads * attention.head_dim
    key_value_size = attention.num_key_value_heads * attention.head_dim
    units = mlp.down_proj.in_features
    projection, start, size = {
        # qkv_proj: every query head, then the key heads, then the value heads, as Phi3Attention splits it.
        "query": (attention.qkv_proj, 0, query_size),
        "key": (attention.qkv_proj, query_size, key_value_size),
        "value": (attention.qkv_proj, query_size + key_value_size, key_value_size),
        "output": (attention.o_proj, 0, attention.o_proj.out_features),
        # gate_up_proj: the gate units, then the up units, as Phi3MLP chunks it.
        "gate": (mlp.gate_up_proj, 0, units),
        "up": (mlp.gate_up_proj, units, units),
        "down": (mlp.down_proj, 0, mlp.down_proj.out_features),
    }[role]
    return projection.weight[start : start + size], None


class OtterPhi3Model(OtterModelMixin, Phi3Model):
    config_class = OtterPhi3Config
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        mlp_activation="mlp.activation_fn",
        sliding_window=lambda attention: getattr(attention.config, "sliding_window", None),
        copy_source=phi3_copy_source,
    )


class OtterPhi3ForCausalLMWithValueHead(OtterForCausalLMMixin, Phi3ForCausalLM):
    config_class = OtterPhi3Config
    backbone_class = OtterPhi3Model


class OtterPhi3ForSequenceClassification(OtterForSequenceClassificationMixin, OtterPhi3ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterPhi3Config",
    "OtterPhi3Model",
    "OtterPhi3ForCausalLMWithValueHead",
    "OtterPhi3ForSequenceClassification",
]
