"""Otter for GPT-2 checkpoints: `GPT2LMHeadModel` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared in the layout below: learned position embeddings (the inserted stream gets
its own position columns too, so copied dimensions keep following their sources); LayerNorm with bias (the
inserted stream takes the original stream's mean and variance); a fused query/key/value projection and Conv1D
layers that keep their weights as (in, out); no rotary embeddings; an MLP without a gate; other module names.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.gpt2.configuration_gpt2 import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel, GPT2Model, eager_attention_forward

from .configuration_otter import OtterConfigMixin
from .inserted_layer import InsertedLayerNorm
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterGPT2Config(OtterConfigMixin, GPT2Config):
    model_type = "otter_gpt2"
    base_model_type = "gpt2"

    # The names the shared Otter code reads, for GPT-2's own settings.
    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.hidden_size

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def attention_dropout(self) -> float:
        return self.attn_pdrop


def gpt2_copy_source(block: nn.Module, role: str):
    # Conv1D keeps its weight as (in_features, out_features); the transposed view is (out, in).
    attention, mlp = block.attn, block.mlp
    if role in ("query", "key", "value"):
        start = ("query", "key", "value").index(role) * attention.split_size
        rows = slice(start, start + attention.split_size)
        return attention.c_attn.weight[:, rows].T, attention.c_attn.bias[rows]
    projection = {"output": attention.c_proj, "up": mlp.c_fc, "down": mlp.c_proj}[role]
    return projection.weight.T, projection.bias


class OtterGPT2Model(OtterModelMixin, GPT2Model):
    config_class = OtterGPT2Config
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        rotary=None,
        norm=InsertedLayerNorm,
        norm_eps="layer_norm_epsilon",
        layers="h",
        token_embedding="wte",
        position_embedding="wpe",
        final_norm="ln_f",
        attention_norm="ln_1",
        mlp_norm="ln_2",
        attention="attn",
        attention_output="attn.c_proj",
        mlp_output="mlp.c_proj",
        mlp_activation="mlp.act",
        gated_mlp=False,
        copy_source=gpt2_copy_source,
    )

    def __init__(self, config):
        if config.add_cross_attention or config.reorder_and_upcast_attn:
            raise ValueError(
                "Otter supports GPT-2 as a decoder only, without `add_cross_attention` or `reorder_and_upcast_attn`."
            )
        super().__init__(config)


class OtterGPT2ForCausalLMWithValueHead(OtterForCausalLMMixin, GPT2LMHeadModel):
    config_class = OtterGPT2Config
    backbone_class = OtterGPT2Model


class OtterGPT2ForSequenceClassification(OtterForSequenceClassificationMixin, OtterGPT2ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterGPT2Config",
    "OtterGPT2Model",
    "OtterGPT2ForCausalLMWithValueHead",
    "OtterGPT2ForSequenceClassification",
]
