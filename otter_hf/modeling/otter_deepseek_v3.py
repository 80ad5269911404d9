"""Otter for DeepSeek-V3 checkpoints: `DeepseekV3ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama:

- **Multi-head latent attention.** The base attention compresses `h_n` into a query latent (`q_a_proj`, normalised
  by `q_a_layernorm`; or a plain `q_proj` where `q_lora_rank` is None) and a key/value latent (`kv_a_proj_with_mqa`,
  normalised by `kv_a_layernorm`) plus one rotary key channel group shared by all heads; `q_b_proj` and
  `kv_b_proj` expand the latents into heads `[nope, rope]` (`qk_nope_head_dim + qk_rope_head_dim`) with values
  of `v_head_dim`. The inserted heads are ordinary grouped-query heads of the base's sizes (query/key
  `qk_nope_head_dim + qk_rope_head_dim`, value `v_head_dim`) reading `[h_n, query latent, key/value latent, g_n]`
  (the latents captured at the two latent norms' outputs), with the base's rotation on their last
  `qk_rope_head_dim` channels (`TrailingRotation`, interleaved as `rope_interleave` says) and the base's scale. A
  linear map of those inputs reproduces every base head exactly, so copy-initialisation copies: a copied head's
  query is its source's `q_b_proj` rows on the query latent, its key the source's `kv_b_proj` key rows on the
  key/value latent and the shared rotary rows of `kv_a_proj_with_mqa` on `h_n`, its value the source's
  `kv_b_proj` value rows. Their keys and values are cached per head beside the base's cached latents.
- **Shared and routed experts.** Layers from `first_k_dense_replace` on are sparse (`DeepseekV3MoE`: a grouped
  top-k router, fused 3-D experts, and `shared_experts`); the inserted down projection reads the block's output
  (`SparseMlp`) and copy-initialisation copies the shared experts' first units. The router is the base's; the
  family computes no auxiliary loss.

DeepSeek-V2 (`otter_deepseek_v2.py`) is the same layout with complex rotary factors.
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    DeepseekV3MoE,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import TrailingRotation
from .inserted_stream import OtterLayout, SparseMlp, linear_copy_source
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterDeepseekV3Config(OtterConfigMixin, DeepseekV3Config):
    model_type = "otter_deepseek_v3"
    base_model_type = "deepseek_v3"


# Saved with the experts per expert, as DeepSeek-V3 checkpoints are.
keep_base_checkpoint_format(OtterDeepseekV3Config)


def latent_attention_latents(layer: nn.Module) -> tuple[str, ...]:
    """The latents the inserted heads read beside `h_n`: the normalised query latent (where queries are
    compressed) and the normalised key/value latent."""
    if layer.self_attn.q_a_layernorm is None:
        return ("self_attn.kv_a_layernorm",)
    return ("self_attn.q_a_layernorm", "self_attn.kv_a_layernorm")


def latent_attention_head_dims(config) -> tuple[int, int]:
    return config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim


def latent_attention_copy_source(attention: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `(weight [heads * head size, columns], bias)` that computes every base head's query, key or value from
    `[h_n, query latent, key/value latent]` (the columns the inserted heads' original-stream block reads), head
    after head as the base lays them out."""
    heads, nope, rope = attention.num_heads, attention.qk_nope_head_dim, attention.qk_rope_head_dim
    kv_rank, value_dim = attention.kv_lora_rank, attention.v_head_dim
    query_rank = attention.q_lora_rank or 0
    hidden = attention.kv_a_proj_with_mqa.in_features
    kv_a = attention.kv_a_proj_with_mqa
    # kv_b_proj's rows, head after head: the head's key (nope) rows, then its value rows.
    kv_b = attention.kv_b_proj.weight.view(heads, nope + value_dim, kv_rank)

    def columns(on_hidden=None, on_query_latent=None, on_kv_latent=None) -> torch.Tensor:
        blocks = [on_hidden, on_query_latent, on_kv_latent]
        widths = [hidden, query_rank, kv_rank]
        reference = next(block for block in blocks if block is not None)
        return torch.cat(
            [
                block if block is not None else reference.new_zeros(reference.shape[0], width)
                for block, width in zip(blocks, widths)
                if width
            ],
            dim=-1,
        )

    if role == "query":
        if attention.q_lora_rank is None:
            weight = columns(on_hidden=attention.q_proj.weight)
        else:
            weight = columns(on_query_latent=attention.q_b_proj.weight)
        bias_rows = None
    elif role == "key":
        key_nope = columns(on_kv_latent=kv_b[:, :nope].reshape(heads * nope, kv_rank)).view(heads, nope, -1)
        key_rope = columns(on_hidden=kv_a.weight[kv_rank:]).expand(heads, rope, -1)
        weight = torch.cat([key_nope, key_rope], dim=1).reshape(heads * (nope + rope), -1)
        bias_rows = None
        if kv_a.bias is not None:
            # The shared rotary key takes kv_a_proj_with_mqa's bias; the key latent is normalised after it.
            bias_rows = torch.cat([kv_a.bias.new_zeros(heads, nope), kv_a.bias[kv_rank:].expand(heads, rope)], dim=1)
            bias_rows = bias_rows.reshape(-1)
    else:
        weight = columns(on_kv_latent=kv_b[:, nope:].reshape(heads * value_dim, kv_rank))
        bias_rows = None
    if kv_a.bias is None:
        return weight, None
    # With `attention_bias` the inserted projection has a bias; only the rotary key rows take a nonzero one.
    return weight, bias_rows if bias_rows is not None else weight.new_zeros(weight.shape[0])


def deepseek_copy_source(sparse_block: type):
    """Copy sources of a DeepSeek layer: the latent attention's heads, the output projection, a dense layer's MLP
    and a sparse layer's shared experts (gate and up; its down is not read, the inserted down projection starts
    as the identity on the block output)."""

    def copy_source(layer: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if role in ("query", "key", "value"):
            return latent_attention_copy_source(layer.self_attn, role)
        if role in ("gate", "up") and isinstance(layer.mlp, sparse_block):
            projection = layer.mlp.shared_experts.get_submodule(f"{role}_proj")
            return projection.weight, projection.bias
        return linear_copy_source(layer, role)

    return copy_source


def deepseek_v3_rotation(config) -> TrailingRotation:
    return TrailingRotation(interleaved=config.rope_interleave)


class OtterDeepseekV3Model(OtterModelMixin, DeepseekV3Model):
    config_class = OtterDeepseekV3Config
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        rotary_for_config=deepseek_v3_rotation,
        attention_latents=latent_attention_latents,
        head_dims=latent_attention_head_dims,
        sparse_mlp=SparseMlp(DeepseekV3MoE),
        copy_source=deepseek_copy_source(DeepseekV3MoE),
    )


class OtterDeepseekV3ForCausalLMWithValueHead(OtterForCausalLMMixin, DeepseekV3ForCausalLM):
    config_class = OtterDeepseekV3Config
    backbone_class = OtterDeepseekV3Model


class OtterDeepseekV3ForSequenceClassification(
    OtterForSequenceClassificationMixin, OtterDeepseekV3ForCausalLMWithValueHead
):
    pass


__all__ = [
    "OtterDeepseekV3Config",
    "OtterDeepseekV3Model",
    "OtterDeepseekV3ForCausalLMWithValueHead",
    "OtterDeepseekV3ForSequenceClassification",
]
