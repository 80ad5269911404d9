"""Otter for Qwen3.5 text checkpoints: `Qwen3_5ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Qwen3: a hybrid of Gated DeltaNet linear-attention layers (`linear_attn`, a recurrent state in
the cache) and full-attention layers, as `layer_types` says. Inserted heads go into the full-attention layers only;
a linear-attention layer gets the inserted MLP alone and the inserted stream passes its token mixing residually
(`OtterLayout.linear_attention`), so the inserted keys and values are cached for the full-attention layers, beside
the base's recurrent states. The full attention gates each head's output with `sigmoid` of a gate its query
projection computes; the inserted heads gate theirs too (`attention_output_gate`). Norms are `x / rms(x) * (1 + w)`
(Gemma's), q/k norms on every head, rotary embeddings on the first quarter of each head.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5ForCausalLM,
    Qwen3_5TextModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import InsertedGemmaRMSNorm
from .inserted_stream import OtterLayout, gated_query_copy_source
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterQwen3_5TextConfig(OtterConfigMixin, Qwen3_5TextConfig):
    model_type = "otter_qwen3_5_text"
    base_model_type = "qwen3_5_text"


class OtterQwen3_5TextModel(OtterModelMixin, Qwen3_5TextModel):
    config_class = OtterQwen3_5TextConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        norm=InsertedGemmaRMSNorm,
        query_key_norms=("q_norm", "k_norm"),
        linear_attention="linear_attn",
        attention_output_gate=True,
        copy_source=gated_query_copy_source,
    )


class OtterQwen3_5ForCausalLMWithValueHead(OtterForCausalLMMixin, Qwen3_5ForCausalLM):
    config_class = OtterQwen3_5TextConfig
    backbone_class = OtterQwen3_5TextModel


class OtterQwen3_5ForSequenceClassification(OtterForSequenceClassificationMixin, OtterQwen3_5ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterQwen3_5TextConfig",
    "OtterQwen3_5TextModel",
    "OtterQwen3_5ForCausalLMWithValueHead",
    "OtterQwen3_5ForSequenceClassification",
]
