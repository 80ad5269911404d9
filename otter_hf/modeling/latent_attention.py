"""Multi-head latent attention (DeepSeek-V2/V3) seen from the inserted heads: what they read and how copied heads
start, shared by the DeepSeek architectures.

The base attention compresses `h_n` into a normalised query latent (`q_a_layernorm`'s output; a plain `q_proj`
where `q_lora_rank` is None) and a normalised key/value latent (`kv_a_layernorm`'s output) plus one rotary key
channel group shared by all heads, then expands them per head. The inserted heads are ordinary heads of the base's
head sizes reading `[h_n, query latent, key/value latent, g_n]`; every base head is a linear map of those inputs,
so a copied head computes exactly what its source does.

This file imports only torch and its siblings, so it ships with a checkpoint as remote code.
"""

import torch
from torch import nn

from .inserted_stream import linear_copy_source
from .quantization import dequantized


class LatentAttentionConfigMixin:
    """The check a latent-attention config adds: every head its own key and value, as the inserted heads copy."""

    def _check_insertion_sizes(self):
        super()._check_insertion_sizes()
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"{self.base_model_type} expands its key/value latent into one key and value per query head, but "
                f"this config has num_key_value_heads={self.num_key_value_heads} for "
                f"num_attention_heads={self.num_attention_heads}; set num_key_value_heads to num_attention_heads "
                "(as DeepSeek's checkpoints do)."
            )


def latent_attention_latents(layer: nn.Module) -> tuple[str, ...]:
    """The latents the inserted heads read beside `h_n`: the normalised query latent (where queries are
    compressed) and the normalised key/value latent."""
    if layer.self_attn.q_a_layernorm is None:
        return ("self_attn.kv_a_layernorm",)
    return ("self_attn.q_a_layernorm", "self_attn.kv_a_layernorm")


def latent_attention_head_dims(config) -> tuple[int, int]:
    return config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim


def _float_weight(projection: nn.Linear) -> torch.Tensor:
    return dequantized(projection.weight, projection)


def latent_head_weights(attention: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `(weight [heads * head size, columns], bias)` that computes every base head's query, key or value from
    `[h_n, query latent, key/value latent]` (the columns the inserted heads' original-stream block reads), head
    after head as the base lays them out; from the projections' float values where the base is quantized."""
    heads, nope, rope = attention.num_heads, attention.qk_nope_head_dim, attention.qk_rope_head_dim
    kv_rank, value_dim = attention.kv_lora_rank, attention.v_head_dim
    query_rank = attention.q_lora_rank or 0
    hidden = attention.kv_a_proj_with_mqa.in_features
    kv_a = attention.kv_a_proj_with_mqa
    # kv_b_proj's rows, head after head: the head's key (nope) rows, then its value rows.
    kv_b = _float_weight(attention.kv_b_proj).view(heads, nope + value_dim, kv_rank)

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
            weight = columns(on_hidden=_float_weight(attention.q_proj))
        else:
            weight = columns(on_query_latent=_float_weight(attention.q_b_proj))
        bias_rows = None
    elif role == "key":
        key_nope = columns(on_kv_latent=kv_b[:, :nope].reshape(heads * nope, kv_rank)).view(heads, nope, -1)
        key_rope = columns(on_hidden=_float_weight(kv_a)[kv_rank:]).expand(heads, rope, -1)
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


def latent_attention_copy_source(layer: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Llama's projections, except the query, key and value: the latent attention's heads
    (`latent_head_weights`)."""
    if role in ("query", "key", "value"):
        return latent_head_weights(layer.self_attn, role)
    return linear_copy_source(layer, role)
