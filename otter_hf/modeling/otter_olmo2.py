"""Otter for OLMo 2 checkpoints: `Olmo2ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared in OLMo 3's layout, which this one reuses: no norm before the attention or
the MLP, which read the raw residual stream (the inserted stream enters their inserted projections raw too), and a
norm on each module's output (its statistics normalise the inserted update, as Gemma's sandwich norms); RMSNorm
applying its weight in float32 before the cast back; q/k norms over the whole query and key projections rather than
per head (the inserted heads read their statistics with their own weights, `ProjectionNorm`); rotary tables in
float32 (the rotated heads are cast back, as the base does); every layer attends to every position. OLMo 3's sliding
layers are its attention modules' own windows, which OLMo 2's do not have.
"""

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers.models.olmo2.configuration_olmo2 import Olmo2Config
from transformers.models.olmo2.modeling_olmo2 import (
    Olmo2ForCausalLM,
    Olmo2Model,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .otter_olmo3 import OtterOlmo3Model
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterOlmo2Config(OtterConfigMixin, Olmo2Config):
    model_type = "otter_olmo2"
    base_model_type = "olmo2"


class OtterOlmo2Model(OtterModelMixin, Olmo2Model):
    config_class = OtterOlmo2Config
    # OLMo 3's layout (post-norms only, q/k norms over the whole projection) with OLMo 2's attention function.
    otter_layout = dataclasses.replace(OtterOlmo3Model.otter_layout, eager_attention_fn=eager_attention_forward)


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
