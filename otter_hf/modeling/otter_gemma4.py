"""Otter for Gemma 4 text checkpoints: `Gemma4ForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Gemma 3, each declared in the layout below: RMSNorm as `w * x / rms(x)` in float32; a norm
without weight on every value head; larger heads (and, with `attention_k_eq_v`, fewer key/value heads whose keys
double as values) in the global layers than in the sliding ones, so the inserted heads of each layer take that
layer's head size; the last `num_kv_shared_layers` layers reusing the keys and values of the last earlier layer
of their kind, which their inserted heads do with the inserted keys and values; a per-layer input block at the end
of each layer, whose gated units the inserted stream reads through a projection of its own; and the whole stream
multiplied by `layer_scalar` at each layer's end, the inserted stream alike.

In the mixture-of-experts variant (`enable_moe_block`) every layer runs routed experts beside its dense MLP, each
with norms of its own, and normalises their sum with `post_feedforward_layernorm`. The inserted units read the
dense MLP's normalised input as in a dense layer, and the inserted down projection reads that sum, the input of
`post_feedforward_layernorm`, in place of the original units (`SparseMlp.combined_output_norm`); the router and
the experts are the base's, untouched. Copy-initialisation copies the dense MLP's first units, the always-on part
of the layer, as a shared expert.
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4ForCausalLM,
    Gemma4TextExperts,
    Gemma4TextModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_layer import InsertedOlmoRMSNorm
from .inserted_stream import (
    KeyValueSharing,
    OtterLayout,
    PerLayerInput,
    SparseMlp,
    linear_copy_source,
    per_layer_attention_shape,
)
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterGemma4TextConfig(OtterConfigMixin, Gemma4TextConfig):
    model_type = "otter_gemma4_text"
    base_model_type = "gemma4_text"


def gemma4_key_value_sharing(attention: nn.Module) -> KeyValueSharing | None:
    """The base attention's own decision: a layer stores its keys and values for the later layers of its kind, or
    reuses the stored ones."""
    if attention.is_kv_shared_layer:
        return KeyValueSharing(attention.layer_type, reuses=True)
    if attention.store_full_length_kv:
        return KeyValueSharing(attention.layer_type, stores=True)
    return None


def gemma4_copy_source(layer: nn.Module, role: str):
    """Llama's projections; where a global layer's keys double as its values (`attention_k_eq_v`, no `v_proj`),
    the value heads copy the key projection."""
    if role == "value" and getattr(layer.self_attn, "v_proj", None) is None:
        role = "key"
    return linear_copy_source(layer, role)


class OtterGemma4TextModel(OtterModelMixin, Gemma4TextModel):
    config_class = OtterGemma4TextConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        norm=InsertedOlmoRMSNorm,
        attention_output_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_output_norm="post_feedforward_layernorm",
        query_key_norms=("q_norm", "k_norm"),
        value_norm="v_norm",
        attention_shape=per_layer_attention_shape,
        key_value_sharing=gemma4_key_value_sharing,
        per_layer_input=PerLayerInput(),
        output_scale="layer_scalar",
        sparse_mlp=SparseMlp(
            Gemma4TextExperts,
            path="experts",
            activation="mlp.act_fn",
            combined_output_norm="post_feedforward_layernorm",
        ),
        copy_source=gemma4_copy_source,
    )


class OtterGemma4ForCausalLMWithValueHead(OtterForCausalLMMixin, Gemma4ForCausalLM):
    config_class = OtterGemma4TextConfig
    backbone_class = OtterGemma4TextModel

    def process_logits(self, logits):
        # As Gemma4ForCausalLM: tanh softcapping of the final logits.
        if self.config.final_logit_softcapping is not None:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        return logits


class OtterGemma4ForSequenceClassification(OtterForSequenceClassificationMixin, OtterGemma4ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterGemma4TextConfig",
    "OtterGemma4TextModel",
    "OtterGemma4ForCausalLMWithValueHead",
    "OtterGemma4ForSequenceClassification",
]
