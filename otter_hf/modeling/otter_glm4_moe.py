"""Otter for GLM-4-MoE checkpoints: `Glm4MoeForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared in the layout below: the first `first_k_dense_replace` layers keep a dense
MLP, the others are a mixture of experts with shared experts (`Glm4MoeMoE`: a sigmoid router with grouped top-k
choice and a score-correction bias over fused 3-D experts, plus a dense `shared_experts` MLP added to their
output); rotary embeddings on the first `partial_rotary_factor` of each head; optional q/k norms on every head
(`use_qk_norm`); q/k/v biases where `attention_bias`, none on the output projection.

In a sparse layer the inserted units read the block's normalised input as in a dense layer, and the inserted down
projection reads the block's output (routed and shared experts together) in place of the original units
(`SparseMlp`); in a dense layer they read the dense MLP's units, as on Llama. Copy-initialisation copies the shared
experts' first units in a sparse layer. The router and its choice are the base's, untouched; GLM-4-MoE's causal
LM computes no auxiliary loss, and the Otter one computes none either.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.glm4_moe.configuration_glm4_moe import Glm4MoeConfig
from transformers.models.glm4_moe.modeling_glm4_moe import (
    Glm4MoeForCausalLM,
    Glm4MoeModel,
    Glm4MoeMoE,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout, SparseMlp, shared_expert_copy_source
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterGlm4MoeConfig(OtterConfigMixin, Glm4MoeConfig):
    model_type = "otter_glm4_moe"
    base_model_type = "glm4_moe"


# Saved with the experts per expert, as GLM-4-MoE checkpoints are.
keep_base_checkpoint_format(OtterGlm4MoeConfig)


def has_query_key_norms(attention: nn.Module) -> bool:
    return attention.use_qk_norm


class OtterGlm4MoeModel(OtterModelMixin, Glm4MoeModel):
    config_class = OtterGlm4MoeConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        query_key_norms=("q_norm", "k_norm"),
        applies_query_key_norms=has_query_key_norms,
        sparse_mlp=SparseMlp(Glm4MoeMoE),
        copy_source=shared_expert_copy_source(Glm4MoeMoE, "shared_experts"),
    )


class OtterGlm4MoeForCausalLMWithValueHead(OtterForCausalLMMixin, Glm4MoeForCausalLM):
    config_class = OtterGlm4MoeConfig
    backbone_class = OtterGlm4MoeModel


class OtterGlm4MoeForSequenceClassification(OtterForSequenceClassificationMixin, OtterGlm4MoeForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterGlm4MoeConfig",
    "OtterGlm4MoeModel",
    "OtterGlm4MoeForCausalLMWithValueHead",
    "OtterGlm4MoeForSequenceClassification",
]
