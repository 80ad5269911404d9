"""Otter for Llama 4 text checkpoints (`llama4_text`): `Llama4ForCausalLM` with parameters inserted into every
layer, and its sequence-classification view.

What differs from Llama:

- **Layers without rotary embeddings** (`no_rope_layers`, read by each attention module into `use_rope`): the
  inserted heads of a layer rotate exactly when its base attention does (the layout's `rotates`, as SmolLM3's),
  with the base's complex factors (`ComplexRotation`).
- **L2 q/k norm** (`use_qk_norm`): a weightless RMSNorm on every query and key head, after the rotation, in the
  rotating layers only; the inserted heads take the same module, after their rotation, where the layer has it.
- **Attention temperature tuning** (`attn_temperature_tuning`): in the layers without rotary embeddings the base
  scales its queries by `1 + attn_scale * log1p(floor((position + 1) / floor_scale))`; the inserted queries are
  scaled alike (`llama4_query_scale`, reading the module's own settings), positions counted after what the cache
  holds as the base counts them.
- **Chunked attention** (`layer_types`, `attention_chunk_size`): the base hands each attention module its layer's
  mask (chunked or full); the inserted heads attend with that mask, and their cache layers are of the layer's
  kind.
- **Interleaved mixture of experts** (`moe_layers`): a sparse layer's `feed_forward` is `Llama4TextMoe` (a top-k
  sigmoid router, fused experts, a shared expert), which returns its output flattened over the tokens with the
  router logits; the inserted down projection reads that output (`SparseMlp`), and copy-initialisation copies
  the shared expert's first units. Dense layers have `intermediate_size_mlp` units. The router is the base's;
  the family computes no auxiliary loss.
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import (
    Llama4ForCausalLM,
    Llama4TextModel,
    Llama4TextMoe,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import ComplexRotation
from .inserted_stream import OtterLayout, SparseMlp, shared_expert_copy_source
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin

LLAMA4_COPY_SOURCES = {
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "output": "self_attn.o_proj",
    "gate": "feed_forward.gate_proj",
    "up": "feed_forward.up_proj",
    "down": "feed_forward.down_proj",
}


@strict
class OtterLlama4TextConfig(OtterConfigMixin, Llama4TextConfig):
    model_type = "otter_llama4_text"
    base_model_type = "llama4_text"


def llama4_projection_copy_source(layer: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Llama's projections, with the MLP's under `feed_forward`."""
    projection = layer.get_submodule(LLAMA4_COPY_SOURCES[role])
    return projection.weight, projection.bias


def llama4_query_scale(attention: nn.Module, positions: torch.Tensor) -> torch.Tensor | None:
    """The factor by position that a Llama 4 attention module applies to its queries (temperature tuning, in its
    layers without rotary embeddings), in float32; None where it applies none."""
    if not attention.attn_temperature_tuning or attention.use_rope:
        return None
    return torch.log1p(torch.floor((positions.float() + 1.0) / attention.floor_scale)) * attention.attn_scale + 1.0


class OtterLlama4TextModel(OtterModelMixin, Llama4TextModel):
    config_class = OtterLlama4TextConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        rotary=ComplexRotation,
        rotates=lambda attention: bool(attention.use_rope),
        query_key_norms=("qk_norm", "qk_norm"),
        query_key_norms_after_rotation=True,
        query_scale=llama4_query_scale,
        mlp="feed_forward",
        mlp_output="feed_forward.down_proj",
        mlp_activation="feed_forward.activation_fn",
        sparse_mlp=SparseMlp(Llama4TextMoe, path="feed_forward", activation="feed_forward.experts.act_fn"),
        dense_units="intermediate_size_mlp",
        copy_source=shared_expert_copy_source(Llama4TextMoe, default=llama4_projection_copy_source, mlp="feed_forward"),
    )


class OtterLlama4TextForCausalLMWithValueHead(OtterForCausalLMMixin, Llama4ForCausalLM):
    config_class = OtterLlama4TextConfig
    backbone_class = OtterLlama4TextModel
    # Llama4ForCausalLM names its backbone `model` (its `language_model` prefix is the multimodal model's).
    base_model_prefix = "model"


class OtterLlama4TextForSequenceClassification(
    OtterForSequenceClassificationMixin, OtterLlama4TextForCausalLMWithValueHead
):
    pass


__all__ = [
    "OtterLlama4TextConfig",
    "OtterLlama4TextModel",
    "OtterLlama4TextForCausalLMWithValueHead",
    "OtterLlama4TextForSequenceClassification",
]
