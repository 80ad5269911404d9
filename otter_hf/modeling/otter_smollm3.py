"""Otter for SmolLM3 checkpoints: `SmolLM3ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama: some layers attend without rotary embeddings (`config.no_rope_layers`, read by each
attention module into its `use_rope`); the inserted heads of such a layer skip them too (the layout's `rotates`).
Each attention module carries its own sliding window, as Gemma 3's.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.smollm3.configuration_smollm3 import SmolLM3Config
from transformers.models.smollm3.modeling_smollm3 import (
    SmolLM3ForCausalLM,
    SmolLM3Model,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterSmolLM3Config(OtterConfigMixin, SmolLM3Config):
    model_type = "otter_smollm3"
    base_model_type = "smollm3"


class OtterSmolLM3Model(OtterModelMixin, SmolLM3Model):
    config_class = OtterSmolLM3Config
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        rotates=lambda attention: bool(attention.use_rope),
    )


class OtterSmolLM3ForCausalLMWithValueHead(OtterForCausalLMMixin, SmolLM3ForCausalLM):
    config_class = OtterSmolLM3Config
    backbone_class = OtterSmolLM3Model


class OtterSmolLM3ForSequenceClassification(OtterForSequenceClassificationMixin, OtterSmolLM3ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterSmolLM3Config",
    "OtterSmolLM3Model",
    "OtterSmolLM3ForCausalLMWithValueHead",
    "OtterSmolLM3ForSequenceClassification",
]
