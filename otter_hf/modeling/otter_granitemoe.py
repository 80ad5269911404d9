"""Otter for Granite-MoE checkpoints: `GraniteMoeForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

A sibling covered by existing layout fields, nothing new: Granite's four multipliers (embedding, residual,
attention scale, logits; see `otter_granite.py`), and in every layer a mixture of experts at `block_sparse_moe`
(`GraniteMoeMoE`: a top-k router and fused 3-D experts, no shared expert). The inserted units read the block's
normalised input, the inserted down projection reads its output (`SparseMlp`); the router, its choice,
`output_router_logits` and the auxiliary loss are the base's. Copy-initialisation copies expert 0's first units.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.granitemoe.configuration_granitemoe import GraniteMoeConfig
from transformers.models.granitemoe.modeling_granitemoe import (
    GraniteMoeForCausalLM,
    GraniteMoeModel,
    GraniteMoeMoE,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout, SparseMlp, first_expert_copy_source, linear_copy_source
from .modeling_otter import OtterModelMixin, OtterMoeForCausalLMMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterGraniteMoeConfig(OtterConfigMixin, GraniteMoeConfig):
    model_type = "otter_granitemoe"
    base_model_type = "granitemoe"


# Saved as Granite-MoE checkpoints are: its renamings name only the sparse block's own parameters.
keep_base_checkpoint_format(OtterGraniteMoeConfig, renamings=True)


def granitemoe_copy_source(layer: nn.Module, role: str):
    """Llama's attention projections; gate and up are expert 0's first units (Granite-MoE has no shared expert).
    Down is not read (the inserted down projection starts as the identity on the block output)."""
    if role in ("gate", "up"):
        return first_expert_copy_source(layer.block_sparse_moe.experts, role)
    return linear_copy_source(layer, role)


class OtterGraniteMoeModel(OtterModelMixin, GraniteMoeModel):
    config_class = OtterGraniteMoeConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        embedding_multiplier="embedding_multiplier",
        residual_multiplier="residual_multiplier",
        sparse_mlp=SparseMlp(GraniteMoeMoE, path="block_sparse_moe", activation="block_sparse_moe.experts.act_fn"),
        copy_source=granitemoe_copy_source,
    )


class OtterGraniteMoeForCausalLMWithValueHead(OtterMoeForCausalLMMixin, GraniteMoeForCausalLM):
    config_class = OtterGraniteMoeConfig
    backbone_class = OtterGraniteMoeModel
    num_experts_field = "num_local_experts"

    def process_logits(self, logits):
        # As GraniteMoeForCausalLM.
        return logits / self.config.logits_scaling


class OtterGraniteMoeForSequenceClassification(
    OtterForSequenceClassificationMixin, OtterGraniteMoeForCausalLMWithValueHead
):
    pass


__all__ = [
    "OtterGraniteMoeConfig",
    "OtterGraniteMoeModel",
    "OtterGraniteMoeForCausalLMWithValueHead",
    "OtterGraniteMoeForSequenceClassification",
]
