"""Otter for Qwen2-MoE checkpoints: `Qwen2MoeForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Qwen2: the MLP of a sparse layer is a mixture of experts with a shared expert
(`Qwen2MoeSparseMoeBlock`: a top-k router over fused 3-D expert parameters, plus a dense `shared_expert` scaled by
the sigmoid of `shared_expert_gate`); the layers in `mlp_only_layers`, or off the `decoder_sparse_step`, keep a
dense MLP. In a sparse layer the inserted units read the block's normalised input as in a dense layer, and the
inserted down projection reads the block's output (routed and shared experts together) in place of the original
units (`SparseMlp`); the router, its top-k choice, `output_router_logits` and the auxiliary loss are the base's,
untouched. Copy-initialisation copies the shared expert's first units. The attention has q/k/v biases, and slides
in the layers `layer_types` marks as sliding.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeForCausalLM,
    Qwen2MoeModel,
    Qwen2MoeSparseMoeBlock,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout, SparseMlp, shared_expert_copy_source
from .modeling_otter import OtterModelMixin, OtterMoeForCausalLMMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterQwen2MoeConfig(OtterConfigMixin, Qwen2MoeConfig):
    model_type = "otter_qwen2_moe"
    base_model_type = "qwen2_moe"


# Saved with the experts per expert, as Qwen2-MoE checkpoints are.
keep_base_checkpoint_format(OtterQwen2MoeConfig)


class OtterQwen2MoeModel(OtterModelMixin, Qwen2MoeModel):
    config_class = OtterQwen2MoeConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        sparse_mlp=SparseMlp(Qwen2MoeSparseMoeBlock),
        copy_source=shared_expert_copy_source(Qwen2MoeSparseMoeBlock),
    )


class OtterQwen2MoeForCausalLMWithValueHead(OtterMoeForCausalLMMixin, Qwen2MoeForCausalLM):
    config_class = OtterQwen2MoeConfig
    backbone_class = OtterQwen2MoeModel


class OtterQwen2MoeForSequenceClassification(
    OtterForSequenceClassificationMixin, OtterQwen2MoeForCausalLMWithValueHead
):
    pass


__all__ = [
    "OtterQwen2MoeConfig",
    "OtterQwen2MoeModel",
    "OtterQwen2MoeForCausalLMWithValueHead",
    "OtterQwen2MoeForSequenceClassification",
]
