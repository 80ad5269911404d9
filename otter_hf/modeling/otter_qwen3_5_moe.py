"""Otter for Qwen3.5-MoE text checkpoints: `Qwen3_5MoeForCausalLM` with parameters inserted into every layer, and
its sequence-classification view.

Qwen3.5's hybrid of Gated DeltaNet and gated full-attention layers (see `otter_qwen3_5.py`: inserted heads in the
full-attention layers only), with a mixture of experts in every layer: a top-k router over fused 3-D expert
parameters plus a dense shared expert scaled by the sigmoid of `shared_expert_gate` (`Qwen3_5MoeSparseMoeBlock`).
The inserted units read the block's normalised input, the inserted down projection reads the block's output
(`SparseMlp`); the router, `output_router_logits` and the auxiliary loss are the base's, untouched.
Copy-initialisation copies the shared expert's first units.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeSparseMoeBlock,
    Qwen3_5MoeTextModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import InsertedGemmaRMSNorm
from .inserted_stream import OtterLayout, SparseMlp, gated_query_copy_source, shared_expert_copy_source
from .modeling_otter import OtterModelMixin, OtterMoeForCausalLMMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterQwen3_5MoeTextConfig(OtterConfigMixin, Qwen3_5MoeTextConfig):
    model_type = "otter_qwen3_5_moe_text"
    base_model_type = "qwen3_5_moe_text"


# Saved with the experts per expert, as Qwen3.5-MoE checkpoints are.
keep_base_checkpoint_format(OtterQwen3_5MoeTextConfig)


class OtterQwen3_5MoeTextModel(OtterModelMixin, Qwen3_5MoeTextModel):
    config_class = OtterQwen3_5MoeTextConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        norm=InsertedGemmaRMSNorm,
        query_key_norms=("q_norm", "k_norm"),
        linear_attention="linear_attn",
        attention_output_gate=True,
        sparse_mlp=SparseMlp(Qwen3_5MoeSparseMoeBlock),
        copy_source=shared_expert_copy_source(Qwen3_5MoeSparseMoeBlock, default=gated_query_copy_source),
    )


class OtterQwen3_5MoeForCausalLMWithValueHead(OtterMoeForCausalLMMixin, Qwen3_5MoeForCausalLM):
    config_class = OtterQwen3_5MoeTextConfig
    backbone_class = OtterQwen3_5MoeTextModel


class OtterQwen3_5MoeForSequenceClassification(
    OtterForSequenceClassificationMixin, OtterQwen3_5MoeForCausalLMWithValueHead
):
    pass


__all__ = [
    "OtterQwen3_5MoeTextConfig",
    "OtterQwen3_5MoeTextModel",
    "OtterQwen3_5MoeForCausalLMWithValueHead",
    "OtterQwen3_5MoeForSequenceClassification",
]
