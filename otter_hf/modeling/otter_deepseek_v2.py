"""Otter for DeepSeek-V2 checkpoints: `DeepseekV2ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

The layout of DeepSeek-V3 (`otter_deepseek_v3.py`: multi-head latent attention, the inserted heads reading
`[h_n, query latent, key/value latent, g_n]`, shared and routed experts from `first_k_dense_replace` on); what
differs is the rotation: complex factors (`freqs_cis`) on each head's last `qk_rope_head_dim` channels
(`ComplexRotation`). DeepSeek-V2-Lite's plain query projection (`q_lora_rank` None) is read as in V3: the
inserted heads then read `[h_n, key/value latent, g_n]`.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2ForCausalLM,
    DeepseekV2Model,
    DeepseekV2Moe,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import ComplexRotation
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
class OtterDeepseekV2Config(LatentAttentionConfigMixin, OtterConfigMixin, DeepseekV2Config):
    model_type = "otter_deepseek_v2"
    base_model_type = "deepseek_v2"


# Saved with the experts per expert, as DeepSeek-V2 checkpoints are.
keep_base_checkpoint_format(OtterDeepseekV2Config)


class OtterDeepseekV2Model(OtterModelMixin, DeepseekV2Model):
    config_class = OtterDeepseekV2Config
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        rotary=ComplexRotation,
        attention_latents=latent_attention_latents,
        head_dims=latent_attention_head_dims,
        sparse_mlp=SparseMlp(DeepseekV2Moe),
        copy_source=shared_expert_copy_source(DeepseekV2Moe, "shared_experts", default=latent_attention_copy_source),
    )


class OtterDeepseekV2ForCausalLMWithValueHead(OtterForCausalLMMixin, DeepseekV2ForCausalLM):
    config_class = OtterDeepseekV2Config
    backbone_class = OtterDeepseekV2Model


class OtterDeepseekV2ForSequenceClassification(
    OtterForSequenceClassificationMixin, OtterDeepseekV2ForCausalLMWithValueHead
):
    pass


__all__ = [
    "OtterDeepseekV2Config",
    "OtterDeepseekV2Model",
    "OtterDeepseekV2ForCausalLMWithValueHead",
    "OtterDeepseekV2ForSequenceClassification",
]
