"""Otter for Mistral checkpoints: `MistralForCausalLM` with parameters inserted into every layer, and its
sequence-classification view."""

from huggingface_hub.dataclasses import strict
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralMLP,
    MistralModel,
    MistralRMSNorm,
    MistralRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import OtterDecoderLayerMixin, OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterMistralConfig(OtterConfigMixin, MistralConfig):
    model_type = "otter_mistral"
    base_model_type = "mistral"


class OtterMistralDecoderLayer(OtterDecoderLayerMixin, MistralDecoderLayer):
    rotary_fn = staticmethod(apply_rotary_pos_emb)
    eager_attention_fn = staticmethod(eager_attention_forward)

    def attention_sliding_window(self):
        # Mistral's attention reads its window from the config, for every layer.
        return getattr(self.config, "sliding_window", None)


class OtterMistralModel(OtterModelMixin, MistralModel):
    config_class = OtterMistralConfig
    decoder_layer_class = OtterMistralDecoderLayer
    rotary_embedding_class = MistralRotaryEmbedding


class OtterMistralForCausalLMWithValueHead(OtterForCausalLMMixin, MistralForCausalLM):
    config_class = OtterMistralConfig
    backbone_class = OtterMistralModel
    # The base modules this class was written for, by their path in a `MistralForCausalLM`.
    written_for = {
        "model.layers.0": MistralDecoderLayer,
        "model.layers.0.self_attn": MistralAttention,
        "model.layers.0.mlp": MistralMLP,
        "model.layers.0.input_layernorm": MistralRMSNorm,
        "model.norm": MistralRMSNorm,
    }


class OtterMistralForSequenceClassification(OtterForSequenceClassificationMixin, OtterMistralForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterMistralConfig",
    "OtterMistralDecoderLayer",
    "OtterMistralModel",
    "OtterMistralForCausalLMWithValueHead",
    "OtterMistralForSequenceClassification",
]
