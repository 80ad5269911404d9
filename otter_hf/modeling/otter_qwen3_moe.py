"""Otter for Qwen3-MoE checkpoints: `Qwen3MoeForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Qwen3: the MLP of a sparse layer is a mixture of experts (`Qwen3MoeSparseMoeBlock`: a top-k
router and fused 3-D expert parameters); the layers in `mlp_only_layers`, or off the `decoder_sparse_step`, keep a
dense MLP. In a sparse layer the inserted units read the block's normalised input as in a dense layer, and the
inserted down projection reads the block's output in place of the original units (`SparseMlp`); the router, its
top-k choice, `output_router_logits` and the auxiliary loss are the base's, untouched. Copy-initialisation copies
expert 0's first units (the family has no shared expert).
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3MoeSparseMoeBlock,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout, SparseMlp, first_expert_copy_source, linear_copy_source
from .modeling_otter import OtterModelMixin, OtterMoeForCausalLMMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterQwen3MoeConfig(OtterConfigMixin, Qwen3MoeConfig):
    model_type = "otter_qwen3_moe"
    base_model_type = "qwen3_moe"


# Saved with the experts per expert, as Qwen3-MoE checkpoints are.
keep_base_checkpoint_format(OtterQwen3MoeConfig)


def qwen3_moe_copy_source(layer: nn.Module, role: str):
    """Llama's projections, except a sparse layer's gate and up: expert 0's first units (Qwen3-MoE has no shared
    expert). A sparse layer's down is not read (the inserted down projection starts as the identity on the block
    output)."""
    if role in ("gate", "up") and isinstance(layer.mlp, Qwen3MoeSparseMoeBlock):
        return first_expert_copy_source(layer.mlp.experts, role)
    return linear_copy_source(layer, role)


class OtterQwen3MoeModel(OtterModelMixin, Qwen3MoeModel):
    config_class = OtterQwen3MoeConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        query_key_norms=("q_norm", "k_norm"),
        sparse_mlp=SparseMlp(Qwen3MoeSparseMoeBlock),
        copy_source=qwen3_moe_copy_source,
    )


class OtterQwen3MoeForCausalLMWithValueHead(OtterMoeForCausalLMMixin, Qwen3MoeForCausalLM):
    config_class = OtterQwen3MoeConfig
    backbone_class = OtterQwen3MoeModel


class OtterQwen3MoeForSequenceClassification(
    OtterForSequenceClassificationMixin, OtterQwen3MoeForCausalLMWithValueHead
):
    pass


__all__ = [
    "OtterQwen3MoeConfig",
    "OtterQwen3MoeModel",
    "OtterQwen3MoeForCausalLMWithValueHead",
    "OtterQwen3MoeForSequenceClassification",
]
