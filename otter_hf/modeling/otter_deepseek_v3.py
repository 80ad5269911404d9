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

from huggingface_hub.dataclasses import strict
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    DeepseekV3MoE,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import TrailingRotation
from .inserted_stream import OtterLayout, SparseMlp, shared_expert_copy_source
from .latent_attention import (
    LatentAttentionConfigMixin,
    latent_attention_copy_source,
    latent_attention_head_dims,
    latent_attention_latents,
)
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin, keep_base_checkpoint_format
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterDeepseekV3Config(LatentAttentionConfigMixin, OtterConfigMixin, DeepseekV3Config):
    model_type = "otter_deepseek_v3"
    base_model_type = "deepseek_v3"


# Saved with the experts per expert, as DeepSeek-V3 checkpoints are.
keep_base_checkpoint_format(OtterDeepseekV3Config)


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
        copy_source=shared_expert_copy_source(DeepseekV3MoE, "shared_experts", default=latent_attention_copy_source),
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
