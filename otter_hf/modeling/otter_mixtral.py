"""Otter for Mixtral checkpoints: `MixtralForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Mistral: every layer's MLP is a mixture of experts (`MixtralSparseMoeBlock`: a top-k router and
fused 3-D expert parameters). The inserted units read the block's normalised input as in a dense layer, and the
inserted down projection reads the block's output in place of the original units (`SparseMlp`); the router, its
top-k choice, `output_router_logits` and the auxiliary loss are the base's, untouched. Copy-initialisation copies
expert 0's first units (Mixtral has no shared expert). As in Mistral, the attention reads its sliding window from
the config, and the inserted heads slide alike.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralForCausalLM,
    MixtralModel,
    MixtralSparseMoeBlock,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout, SparseMlp, first_expert_copy_source, linear_copy_source
from .modeling_otter import OtterModelMixin, OtterMoeForCausalLMMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterMixtralConfig(OtterConfigMixin, MixtralConfig):
    model_type = "otter_mixtral"
    base_model_type = "mixtral"


# Saved with the experts per expert (`w1`, `w2`, `w3`), as Mixtral checkpoints are.
keep_base_checkpoint_format(OtterMixtralConfig)


def mixtral_copy_source(layer: nn.Module, role: str):
    """Llama's attention projections; gate and up are expert 0's first units (Mixtral has no shared expert). Down
    is not read (the inserted down projection starts as the identity on the block output)."""
    if role in ("gate", "up"):
        return first_expert_copy_source(layer.mlp.experts, role)
    return linear_copy_source(layer, role)


class OtterMixtralModel(OtterModelMixin, MixtralModel):
    config_class = OtterMixtralConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        sliding_window=lambda attention: getattr(attention.config, "sliding_window", None),
        sparse_mlp=SparseMlp(MixtralSparseMoeBlock),
        copy_source=mixtral_copy_source,
    )


class OtterMixtralForCausalLMWithValueHead(OtterMoeForCausalLMMixin, MixtralForCausalLM):
    config_class = OtterMixtralConfig
    backbone_class = OtterMixtralModel


class OtterMixtralForSequenceClassification(OtterForSequenceClassificationMixin, OtterMixtralForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterMixtralConfig",
    "OtterMixtralModel",
    "OtterMixtralForCausalLMWithValueHead",
    "OtterMixtralForSequenceClassification",
]
