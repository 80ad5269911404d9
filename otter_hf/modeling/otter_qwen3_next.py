"""Otter for Qwen3-Next checkpoints: `Qwen3NextForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

The layout of Qwen3.5-MoE (`otter_qwen3_5_moe.py`): Gated DeltaNet layers mixed with gated full-attention layers
(inserted heads in the full-attention layers only), a mixture of experts with a shared expert
(`Qwen3NextSparseMoeBlock`), `(1 + w)` norms. What differs: the layers in `mlp_only_layers`, or off the
`decoder_sparse_step`, keep a dense MLP, read as in a dense family.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextForCausalLM,
    Qwen3NextModel,
    Qwen3NextSparseMoeBlock,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import InsertedGemmaRMSNorm
from .inserted_stream import OtterLayout, SparseMlp, gated_query_copy_source, shared_expert_copy_source
from .modeling_otter import OtterModelMixin, OtterMoeForCausalLMMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterQwen3NextConfig(OtterConfigMixin, Qwen3NextConfig):
    model_type = "otter_qwen3_next"
    base_model_type = "qwen3_next"


# Saved with the experts per expert, as Qwen3-Next checkpoints are.
keep_base_checkpoint_format(OtterQwen3NextConfig)


class OtterQwen3NextModel(OtterModelMixin, Qwen3NextModel):
    config_class = OtterQwen3NextConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        norm=InsertedGemmaRMSNorm,
        query_key_norms=("q_norm", "k_norm"),
        linear_attention="linear_attn",
        attention_output_gate=True,
        sparse_mlp=SparseMlp(Qwen3NextSparseMoeBlock),
        copy_source=shared_expert_copy_source(Qwen3NextSparseMoeBlock, default=gated_query_copy_source),
    )


class OtterQwen3NextForCausalLMWithValueHead(OtterMoeForCausalLMMixin, Qwen3NextForCausalLM):
    config_class = OtterQwen3NextConfig
    backbone_class = OtterQwen3NextModel


class OtterQwen3NextForSequenceClassification(
    OtterForSequenceClassificationMixin, OtterQwen3NextForCausalLMWithValueHead
):
    pass


__all__ = [
    "OtterQwen3NextConfig",
    "OtterQwen3NextModel",
    "OtterQwen3NextForCausalLMWithValueHead",
    "OtterQwen3NextForSequenceClassification",
]
