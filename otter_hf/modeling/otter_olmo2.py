"""Otter for OLMo 2 checkpoints: `Olmo2ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared in the layout below: no norm before the attention or the MLP, which read
the raw residual stream (the inserted stream enters their inserted projections raw too), and a norm on each
module's output (its statistics normalise the inserted update, as Gemma's sandwich norms); RMSNorm applying its
weight in float32 before the cast back; q/k norms over the whole query and key projections rather than per head
(the inserted heads read their statistics with their own weights, `ProjectionNorm`); rotary tables in float32
(the rotated heads are cast back, as the base does); every layer attends to every position. The layout is
`otter_olmo3.py`'s, whose sliding layers OLMo 2 does not have.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.olmo2.configuration_olmo2 import Olmo2Config
from transformers.models.olmo2.modeling_olmo2 import (
    Olmo2ForCausalLM,
    Olmo2Model,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import InsertedOlmoRMSNorm
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterOlmo2Config(OtterConfigMixin, Olmo2Config):
    model_type = "otter_olmo2"
    base_model_type = "olmo2"


class OtterOlmo2Model(OtterModelMixin, Olmo2Model):
    config_class = OtterOlmo2Config
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        norm=InsertedOlmoRMSNorm,
        attention_norm=None,
        attention_output_norm="post_attention_layernorm",
        mlp_norm=None,
        mlp_output_norm="post_feedforward_layernorm",
        query_key_projection_norms=("q_norm", "k_norm"),
    )


class OtterOlmo2ForCausalLMWithValueHead(OtterForCausalLMMixin, Olmo2ForCausalLM):
    config_class = OtterOlmo2Config
    backbone_class = OtterOlmo2Model


class OtterOlmo2ForSequenceClassification(OtterForSequenceClassificationMixin, OtterOlmo2ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterOlmo2Config",
    "OtterOlmo2Model",
    "OtterOlmo2ForCausalLMWithValueHead",
    "OtterOlmo2ForSequenceClassification",
]
