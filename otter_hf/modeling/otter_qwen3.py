"""Otter for Qwen3 checkpoints: `Qwen3ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama: every query and key head is RMS-normalised (`q_norm`, `k_norm`) before the rotary
embedding. The inserted heads go through the same frozen norms, so a copied head attends as its source does.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3ForCausalLM,
    Qwen3Model,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterQwen3Config(OtterConfigMixin, Qwen3Config):
    model_type = "otter_qwen3"
    base_model_type = "qwen3"


class OtterQwen3Model(OtterModelMixin, Qwen3Model):
    config_class = OtterQwen3Config
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        query_key_norms=("q_norm", "k_norm"),
    )


class OtterQwen3ForCausalLMWithValueHead(OtterForCausalLMMixin, Qwen3ForCausalLM):
    config_class = OtterQwen3Config
    backbone_class = OtterQwen3Model


class OtterQwen3ForSequenceClassification(OtterForSequenceClassificationMixin, OtterQwen3ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterQwen3Config",
    "OtterQwen3Model",
    "OtterQwen3ForCausalLMWithValueHead",
    "OtterQwen3ForSequenceClassification",
]
