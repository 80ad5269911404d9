"""Otter for OLMo 3 checkpoints: `Olmo3ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared in the layout below: no norm before the attention or the MLP, which read
the raw residual stream (the inserted stream enters their inserted projections raw too), and a norm on each
module's output (its statistics normalise the inserted update, as Gemma's sandwich norms); RMSNorm applying its
weight in float32 before the cast back; q/k norms over the whole query and key projections rather than per head
(the inserted heads read their statistics with their own weights, `ProjectionNorm`); rotary tables in float32
(the rotated heads are cast back, as the base does); sliding and full layers (each attention module carries its
own window, and each layer type its own rotary tables). `otter_olmo2.py` is the same layout without the sliding
layers.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.olmo3.configuration_olmo3 import Olmo3Config
from transformers.models.olmo3.modeling_olmo3 import (
    Olmo3ForCausalLM,
    Olmo3Model,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import InsertedOlmoRMSNorm
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterOlmo3Config(OtterConfigMixin, Olmo3Config):
    model_type = "otter_olmo3"
    base_model_type = "olmo3"


class OtterOlmo3Model(OtterModelMixin, Olmo3Model):
    config_class = OtterOlmo3Config
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        norm=InsertedOlmoRMSNorm,
        attention_norm=None,
        attention_output_norm="post_attention_layernorm",
        mlp_norm=None,
        mlp_output_norm="post_feedforward_layernorm",
        query_key_projection_norms=("q_norm", "k_norm"),
    )


class OtterOlmo3ForCausalLMWithValueHead(OtterForCausalLMMixin, Olmo3ForCausalLM):
    config_class = OtterOlmo3Config
    backbone_class = OtterOlmo3Model


class OtterOlmo3ForSequenceClassification(OtterForSequenceClassificationMixin, OtterOlmo3ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterOlmo3Config",
    "OtterOlmo3Model",
    "OtterOlmo3ForCausalLMWithValueHead",
    "OtterOlmo3ForSequenceClassification",
]
