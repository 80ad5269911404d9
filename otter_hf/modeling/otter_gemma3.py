"""Otter for Gemma 3 text checkpoints: `Gemma3ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared below: embeddings scaled by sqrt(hidden_size) (the inserted columns
too); RMSNorm as `x / rms(x) * (1 + w)` in float32; norms on each module's output as well as its input;
q/k norms on every head (the inserted heads share them); sliding and global layers alternating (the base
attention modules carry their own window); a GELU-tanh gated MLP (the inserted units use the same activation);
and final-logit softcapping.
"""

import torch
from huggingface_hub.dataclasses import strict
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3Attention,
    Gemma3DecoderLayer,
    Gemma3ForCausalLM,
    Gemma3MLP,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextModel,
    Gemma3TextScaledWordEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import (
    OtterDecoderLayerMixin,
    OtterEmbeddingMixin,
    OtterForCausalLMMixin,
    OtterModelMixin,
    OtterNorm,
)
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterGemma3TextConfig(OtterConfigMixin, Gemma3TextConfig):
    model_type = "otter_gemma3_text"
    base_model_type = "gemma3_text"


class OtterGemma3ScaledEmbedding(OtterEmbeddingMixin, Gemma3TextScaledWordEmbedding):
    """Gemma's token embedding, scaled by sqrt(hidden_size); the inserted columns are scaled alike."""

    def __init__(self, config):
        super().__init__(config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5)
        self.add_inserted_columns(config)

    def embed_inserted(self, input_ids):
        return super().embed_inserted(input_ids) * self.embed_scale.to(self.inserted_weight.dtype)


class OtterGemma3RMSNorm(OtterNorm):
    """Gemma's RMSNorm, `x / rms(x) * (1 + w)` computed in float32; the inserted stream shares `rms(h)`."""

    neutral_weight = 0.0

    def normalize(self, original, inserted):
        original_float = original.float()
        inverse_rms = torch.rsqrt(original_float.pow(2).mean(-1, keepdim=True) + self.eps)
        original_normed = (original_float * inverse_rms * (1.0 + self.weight.float())).type_as(original)
        if inserted is None:
            return original_normed, None
        inserted_normed = (inserted.float() * inverse_rms * (1.0 + self.inserted_weight.float())).type_as(inserted)
        return original_normed, inserted_normed


class OtterGemma3DecoderLayer(OtterDecoderLayerMixin, Gemma3DecoderLayer):
    norm_class = OtterGemma3RMSNorm
    attention_output_norm = "post_attention_layernorm"
    mlp_norm = "pre_feedforward_layernorm"
    mlp_output_norm = "post_feedforward_layernorm"
    rotary_fn = staticmethod(apply_rotary_pos_emb)
    eager_attention_fn = staticmethod(eager_attention_forward)

    def project_heads(self, normed):
        query, key, value = super().project_heads(normed)
        query, key = self.normalize_query_key(query, key)
        return query, key, value

    def normalize_query_key(self, query, key):
        return self.self_attn.q_norm(query), self.self_attn.k_norm(key)


class OtterGemma3TextModel(OtterModelMixin, Gemma3TextModel):
    config_class = OtterGemma3TextConfig
    decoder_layer_class = OtterGemma3DecoderLayer
    rotary_embedding_class = Gemma3RotaryEmbedding
    embedding_class = OtterGemma3ScaledEmbedding


class OtterGemma3ForCausalLMWithValueHead(OtterForCausalLMMixin, Gemma3ForCausalLM):
    config_class = OtterGemma3TextConfig
    backbone_class = OtterGemma3TextModel
    # The base modules this class was written for, by their path in a `Gemma3ForCausalLM`.
    written_for = {
        "model.embed_tokens": Gemma3TextScaledWordEmbedding,
        "model.layers.0": Gemma3DecoderLayer,
        "model.layers.0.self_attn": Gemma3Attention,
        "model.layers.0.mlp": Gemma3MLP,
        "model.layers.0.input_layernorm": Gemma3RMSNorm,
        "model.norm": Gemma3RMSNorm,
    }

    def process_logits(self, logits):
        # As Gemma3ForCausalLM: tanh softcapping of the final logits.
        if self.config.final_logit_softcapping is not None:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        return logits


class OtterGemma3ForSequenceClassification(OtterForSequenceClassificationMixin, OtterGemma3ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterGemma3TextConfig",
    "OtterGemma3DecoderLayer",
    "OtterGemma3TextModel",
    "OtterGemma3ForCausalLMWithValueHead",
    "OtterGemma3ForSequenceClassification",
]
