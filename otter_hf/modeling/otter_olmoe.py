"""Otter for OLMoE checkpoints: `OlmoeForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

A sibling covered by existing layout fields, nothing new: Llama's pre-norms, OLMo 2's q/k norms over the whole
query and key projections (the inserted heads read their statistics with their own weights, `ProjectionNorm`),
and in every layer a mixture of experts as Qwen3-MoE's (`OlmoeSparseMoeBlock`: a softmax top-k router and fused
3-D experts, no shared expert). The inserted units read the block's normalised input, the inserted down
projection reads its output (`SparseMlp`); the router, its choice, `output_router_logits` and the auxiliary loss
are the base's. Copy-initialisation copies expert 0's first units.

OLMoE's optional `clip_qkv` (clamping queries, keys and values after the norms) has no counterpart for the
inserted heads: a config that sets it is refused when the model is built.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import (
    OlmoeForCausalLM,
    OlmoeModel,
    OlmoeSparseMoeBlock,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout, SparseMlp, first_expert_copy_source, linear_copy_source
from .modeling_otter import OtterModelMixin, OtterMoeForCausalLMMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterOlmoeConfig(OtterConfigMixin, OlmoeConfig):
    model_type = "otter_olmoe"
    base_model_type = "olmoe"


# Saved with the experts per expert, as OLMoE checkpoints are.
keep_base_checkpoint_format(OtterOlmoeConfig)


def olmoe_copy_source(layer: nn.Module, role: str):
    """Llama's attention projections; gate and up are expert 0's first units (OLMoE has no shared expert). Down
    is not read (the inserted down projection starts as the identity on the block output)."""
    if role in ("gate", "up"):
        return first_expert_copy_source(layer.mlp.experts, role)
    return linear_copy_source(layer, role)


class OtterOlmoeModel(OtterModelMixin, OlmoeModel):
    config_class = OtterOlmoeConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        query_key_projection_norms=("q_norm", "k_norm"),
        sparse_mlp=SparseMlp(OlmoeSparseMoeBlock),
        copy_source=olmoe_copy_source,
    )

    def __init__(self, config):
        if config.clip_qkv is not None:
            raise ValueError(
                f"This olmoe config clamps queries, keys and values (clip_qkv={config.clip_qkv}) inside the base "
                "attention (`self_attn`), after its q/k norms, where Otter has no capture point: the inserted heads "
                "cannot attend as the base heads do. Otter supports olmoe with clip_qkv=None; to add clamping, see "
                "otter_hf/modeling/README.md."
            )
        super().__init__(config)


class OtterOlmoeForCausalLMWithValueHead(OtterMoeForCausalLMMixin, OlmoeForCausalLM):
    config_class = OtterOlmoeConfig
    backbone_class = OtterOlmoeModel


class OtterOlmoeForSequenceClassification(OtterForSequenceClassificationMixin, OtterOlmoeForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterOlmoeConfig",
    "OtterOlmoeModel",
    "OtterOlmoeForCausalLMWithValueHead",
    "OtterOlmoeForSequenceClassification",
]
