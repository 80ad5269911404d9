"""Otter for Gemma 3 text checkpoints: `Gemma3ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared in the layout below: embeddings scaled by sqrt(hidden_size) (the
inserted columns too, by the embedding's own `embed_scale`); RMSNorm as `x / rms(x) * (1 + w)` in float32; norms
on each module's output as well as its input; q/k norms on every head (the inserted heads share them); sliding
and global layers alternating (each base attention module carries its own window); and final-logit softcapping,
which draft heads repeat on their hidden states.
"""

import torch
from huggingface_hub.dataclasses import strict
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3ForCausalLM,
    Gemma3TextModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import InsertedGemmaRMSNorm
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterGemma3TextConfig(OtterConfigMixin, Gemma3TextConfig):
    model_type = "otter_gemma3_text"
    base_model_type = "gemma3_text"


class OtterGemma3TextModel(OtterModelMixin, Gemma3TextModel):
    config_class = OtterGemma3TextConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        norm=InsertedGemmaRMSNorm,
        attention_output_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_output_norm="post_feedforward_layernorm",
        query_key_norms=("q_norm", "k_norm"),
    )


class OtterGemma3ForCausalLMWithValueHead(OtterForCausalLMMixin, Gemma3ForCausalLM):
    config_class = OtterGemma3TextConfig
    backbone_class = OtterGemma3TextModel

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
    "OtterGemma3TextModel",
    "OtterGemma3ForCausalLMWithValueHead",
    "OtterGemma3ForSequenceClassification",
]
