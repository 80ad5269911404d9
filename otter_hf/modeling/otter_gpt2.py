"""Otter for GPT-2 checkpoints: `GPT2LMHeadModel` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama, each declared below: learned position embeddings (the inserted stream gets its own
position columns too, so copied dimensions keep following their sources); LayerNorm with bias (the inserted
stream takes the original stream's mean and variance); a fused query/key/value projection and Conv1D layers
that keep their weights as (in, out); no rotary embeddings; an MLP without a gate; and a decoder that passes the
cache and the mask to each block by position.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.gpt2.configuration_gpt2 import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2MLP,
    GPT2Attention,
    GPT2Block,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .modeling_otter import (
    OtterDecoderLayerMixin,
    OtterEmbedding,
    OtterEmbeddingMixin,
    OtterForCausalLMMixin,
    OtterInsertedUngatedMLP,
    OtterLayerNorm,
)
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


class OtterGPT2PositionEmbedding(OtterEmbeddingMixin, nn.Embedding):
    """GPT-2's learned position embedding, plus position columns of the inserted stream."""

    def __init__(self, config):
        super().__init__(config.max_position_embeddings, config.hidden_size)
        self.add_inserted_columns(config)


class OtterGPT2Block(OtterDecoderLayerMixin, GPT2Block):
    norm_class = OtterLayerNorm
    inserted_mlp_class = OtterInsertedUngatedMLP
    attention_norm = "ln_1"
    mlp_norm = "ln_2"
    eager_attention_fn = staticmethod(eager_attention_forward)

    def __init__(self, config, layer_idx: int):
        if config.add_cross_attention or config.reorder_and_upcast_attn:
            raise ValueError(
                "Otter supports GPT-2 as a decoder only, without `add_cross_attention` or `reorder_and_upcast_attn`."
            )
        super().__init__(config, layer_idx)

    @property
    def self_attn(self) -> GPT2Attention:
        # The shared layer code names the attention module `self_attn`; GPT-2 calls it `attn`.
        return self.attn

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None, **kwargs):
        # GPT2Model passes the cache and the mask by position; a decoder-only block takes no encoder states.
        if encoder_hidden_states is not None:
            raise ValueError("Otter supports GPT-2 as a decoder only: it takes no `encoder_hidden_states`.")
        kwargs.pop("encoder_attention_mask", None)
        return super().forward(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)

    def prepare_inserted_query_key(self, query, key, position_embeddings):
        return query, key  # positions are in the embeddings, not rotated into queries and keys

    def original_attention(self, normed, position_embeddings, attention_mask, past_key_values, attention_fn, **kwargs):
        attention = self.attn
        query, key, value = attention.c_attn(normed).split(attention.split_size, dim=2)
        head_shape = (*normed.shape[:-1], -1, attention.head_dim)
        key = key.view(head_shape).transpose(1, 2)
        value = value.view(head_shape).transpose(1, 2)
        query = query.view(head_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, attention.layer_idx)
        heads, _ = attention_fn(
            attention,
            query,
            key,
            value,
            attention_mask,
            dropout=attention.attn_dropout.p if attention.training else 0.0,
            scaling=attention.scaling,
            **kwargs,
        )
        heads = heads.reshape(*heads.shape[:-2], -1).contiguous()
        return heads, attention.resid_dropout(attention.c_proj(heads))

    def mlp_activation(self):
        return self.mlp.act

    def original_mlp(self, normed):
        mlp = self.mlp
        units = mlp.act(mlp.c_fc(normed))
        return units, mlp.dropout(mlp.c_proj(units))

    def copy_source(self, role):
        # Conv1D keeps its weight as (in_features, out_features); the transposed view is (out, in).
        attention, mlp = self.attn, self.mlp
        if role in ("query", "key", "value"):
            start = ("query", "key", "value").index(role) * attention.split_size
            rows = slice(start, start + attention.split_size)
            return attention.c_attn.weight[:, rows].T, attention.c_attn.bias[rows]
        projection = {"output": attention.c_proj, "up": mlp.c_fc, "down": mlp.c_proj}[role]
        return projection.weight.T, projection.bias


class OtterGPT2Model(GPT2Model):
    """GPT-2's decoder built from Otter blocks; its forward is GPT-2's own."""

    config_class = OtterGPT2Config

    def __init__(self, config):
        GPT2PreTrainedModel.__init__(self, config)
        self.embed_dim = config.hidden_size
        self.wte = OtterEmbedding(config)
        self.wpe = OtterGPT2PositionEmbedding(config)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([OtterGPT2Block(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.ln_f = OtterLayerNorm.from_config(config)
        self.gradient_checkpointing = False
        self._attn_implementation = config._attn_implementation
        self.post_init()

    def otter_decoder_layers(self) -> list[OtterGPT2Block]:
        return list(self.h)


class OtterGPT2ForCausalLMWithValueHead(OtterForCausalLMMixin, GPT2LMHeadModel):
    config_class = OtterGPT2Config
    backbone_class = OtterGPT2Model
    # The base modules this class was written for, by their path in a `GPT2LMHeadModel`.
    written_for = {
        "transformer.wpe": nn.Embedding,
        "transformer.h.0": GPT2Block,
        "transformer.h.0.attn": GPT2Attention,
        "transformer.h.0.mlp": GPT2MLP,
        "transformer.h.0.ln_1": nn.LayerNorm,
        "transformer.ln_f": nn.LayerNorm,
    }


class OtterGPT2ForSequenceClassification(OtterForSequenceClassificationMixin, OtterGPT2ForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterGPT2Config",
    "OtterGPT2Block",
    "OtterGPT2Model",
    "OtterGPT2ForCausalLMWithValueHead",
    "OtterGPT2ForSequenceClassification",
]
