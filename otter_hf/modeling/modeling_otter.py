"""The insertion mechanics shared by every Otter architecture.

An Otter model carries two residual streams through the decoder: the original stream `h` (width
`hidden_size`), computed by the base model's own modules on the very same tensors so that the original
logits are bit-identical, and the inserted stream `g` (width `inserted_hidden_size`), which reads `h`
but is never read by it. Between modules the two streams travel as one widened tensor `[h, g]`, so the
architecture's own model forward (masks, rotary embeddings, decoder loop, caching) runs unchanged.

This file and the per-architecture files import only torch, transformers, safetensors and their
siblings, so they can be shipped next to a checkpoint for `trust_remote_code`.
"""

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, make_dataclass

import torch
from torch import nn
from transformers import LogitsProcessorList, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicCache, get_layer_types_and_kwargs
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import ModelOutput

from .configuration_otter import attention_head_size
from .inserted_heads import INSERTED_HEADS, FinalStreams
from .persistence import (
    base_weights_fingerprint,
    replace_files,
    save_inserted_parameters,
    save_remote_code,
    weight_files_of,
)
from .token_reward_guidance import token_reward_guidance
from .verification import check_finite_inserted_weights, check_generation_arguments, load_verified

# A parameter is inserted when one of its name components is a head's attribute or starts with `inserted_`.
INSERTED_PARAMETER_PATTERN = re.compile(
    rf"(^|\.)({'|'.join(head.attribute for head in INSERTED_HEADS)}|inserted_\w+)(\.|$)"
)


def is_inserted_parameter(name: str) -> bool:
    return INSERTED_PARAMETER_PATTERN.search(name) is not None


def split_streams(hidden_states: torch.Tensor, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a widened tensor into the original stream and the inserted stream (None when not widened).

    The original part is made contiguous so the base kernels see the same memory layout as in the base model.
    """
    if hidden_states.shape[-1] == hidden_size:
        return hidden_states, None
    return hidden_states[..., :hidden_size].contiguous(), hidden_states[..., hidden_size:]


def join_streams(original: torch.Tensor, inserted: torch.Tensor | None) -> torch.Tensor:
    return original if inserted is None else torch.cat([original, inserted], dim=-1)


def ensure_inserted_cache_layers(cache: Cache, config) -> None:
    """Give the inserted heads their own cache layers, `num_hidden_layers + i` for decoder layer `i`.

    Keeping them beside the original layers (rather than inside them) leaves the original keys and values
    exactly as the base model stores them, while `crop`, `reorder_cache` and friends still reach both.
    """
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"Otter models keep their inserted keys and values in a DynamicCache; got {type(cache).__name__}. "
            "Pass a DynamicCache (the default of generate()) or no cache at all."
        )
    if cache.layer_class_to_replicate is not None:
        return  # a cache without a config grows by itself to any layer index
    num_layers = config.num_hidden_layers
    if len(cache.layers) == num_layers:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        cache.layers.extend(
            DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs) for layer_type, kwargs in zip(layer_types, layer_kwargs)
        )
    elif len(cache.layers) != 2 * num_layers:
        raise ValueError(
            f"This cache has {len(cache.layers)} layers; an Otter model with {num_layers} decoder layers needs "
            f"{num_layers} (a fresh cache) or {2 * num_layers} (one it has already filled)."
        )


class OtterEmbeddingMixin:
    """Adds the inserted stream's own embedding columns (`inserted_weight`) to an architecture's token embedding.

    The original stream is the base embedding's own forward; `embed_inserted` gives the inserted stream, scaled
    as the architecture scales the original one.
    """

    def add_inserted_columns(self, config) -> None:
        self.inserted_weight = nn.Parameter(torch.empty(self.num_embeddings, config.inserted_hidden_size))
        self.inserted_enabled = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        original = super().forward(input_ids)
        if not self.inserted_enabled:
            return original
        return join_streams(original, self.embed_inserted(input_ids))

    def embed_inserted(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.inserted_weight)


class OtterEmbedding(OtterEmbeddingMixin, nn.Embedding):
    """The base token embedding (unscaled, as in Llama), plus the inserted stream's embedding columns."""

    def __init__(self, config):
        super().__init__(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.add_inserted_columns(config)


class OtterNorm(nn.Module):
    """A norm whose statistics come from the original stream only.

    `normalize` runs the base norm's own operations on the original stream and applies the same statistics,
    with the inserted stream's own weight, to the inserted stream, so nothing in it changes the original result.
    `neutral_weight` is the inserted weight that leaves the normalised inserted stream unscaled.
    """

    neutral_weight = 1.0

    def __init__(self, hidden_size: int, inserted_size: int, eps: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.full((hidden_size,), self.neutral_weight))
        self.inserted_weight = nn.Parameter(torch.full((inserted_size,), self.neutral_weight))
        self.eps = eps

    @classmethod
    def from_config(cls, config):
        return cls(config.hidden_size, config.inserted_hidden_size, config.rms_norm_eps)

    def normalize(
        self, original: torch.Tensor, inserted: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return join_streams(*self.normalize(*split_streams(hidden_states, self.hidden_size)))

    def extra_repr(self):
        return f"{self.hidden_size} + {self.inserted_weight.shape[0]} inserted, eps={self.eps}"


class OtterRMSNorm(OtterNorm):
    """Llama's RMSNorm, `w * x / rms(x)` cast back before the weight; the inserted stream shares `rms(h)`."""

    def normalize(self, original, inserted):
        input_dtype = original.dtype
        original = original.to(torch.float32)
        variance = original.pow(2).mean(-1, keepdim=True)
        inverse_rms = torch.rsqrt(variance + self.eps)
        original_normed = self.weight * (original * inverse_rms).to(input_dtype)
        if inserted is None:
            return original_normed, None
        inserted_normed = self.inserted_weight * (inserted.to(torch.float32) * inverse_rms).to(input_dtype)
        return original_normed, inserted_normed


class OtterLayerNorm(OtterNorm):
    """LayerNorm with bias (GPT-2); the inserted stream is centred and scaled by the original stream's mean and
    variance, then takes its own weight and bias (`inserted_bias`)."""

    def __init__(self, hidden_size: int, inserted_size: int, eps: float):
        super().__init__(hidden_size, inserted_size, eps)
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.inserted_bias = nn.Parameter(torch.zeros(inserted_size))

    @classmethod
    def from_config(cls, config):
        return cls(config.hidden_size, config.inserted_hidden_size, config.layer_norm_epsilon)

    def normalize(self, original, inserted):
        original_normed = nn.functional.layer_norm(original, (self.hidden_size,), self.weight, self.bias, self.eps)
        if inserted is None:
            return original_normed, None
        variance, mean = torch.var_mean(original, dim=-1, keepdim=True, correction=0)
        inserted_normed = (inserted - mean) * torch.rsqrt(variance + self.eps) * self.inserted_weight + self.inserted_bias
        return original_normed, inserted_normed


class OtterInsertedAttention(nn.Module):
    """The inserted attention heads of one layer.

    Queries, keys and values read both streams (`[h_n, g_n]`); the output, added to the inserted stream
    only, reads the original heads' outputs and the inserted heads' outputs.
    """

    def __init__(self, config, layer_idx: int, qkv_bias: bool, output_bias: bool):
        super().__init__()
        self.config = config
        self.head_dim = attention_head_size(config)
        self.num_heads = config.inserted_num_attention_heads
        self.num_key_value_heads = config.inserted_num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        # The inserted heads cache after all original layers, see `ensure_inserted_cache_layers`.
        self.layer_idx = config.num_hidden_layers + layer_idx
        input_size = config.hidden_size + config.inserted_hidden_size
        qkv_size = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        heads_size = (config.num_attention_heads + self.num_heads) * self.head_dim
        self.qkv_proj = nn.Linear(input_size, qkv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(heads_size, config.inserted_hidden_size, bias=output_bias)

    def forward(
        self,
        normed: torch.Tensor,
        inserted_normed: torch.Tensor,
        original_heads: torch.Tensor,
        prepare_query_key: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        attention_fn: Callable,
        scaling: float,
        **kwargs,
    ) -> torch.Tensor:
        input_shape = normed.shape[:-1]
        qkv = self.qkv_proj(join_streams(normed, inserted_normed)).view(*input_shape, -1, self.head_dim)
        query, key, value = qkv.transpose(1, 2).split(
            [self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=1
        )
        query, key = prepare_query_key(query, key)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        heads, _ = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=scaling,
            **kwargs,
        )
        heads = heads.reshape(*input_shape, -1)
        return self.o_proj(torch.cat([original_heads, heads], dim=-1))


class OtterInsertedMLP(nn.Module):
    """The inserted gated units of one layer: gate and up read both streams, down reads all units."""

    def __init__(self, config, bias: bool, act_fn: Callable):
        super().__init__()
        input_size = config.hidden_size + config.inserted_hidden_size
        self.gate_up_proj = nn.Linear(input_size, 2 * config.inserted_intermediate_size, bias=bias)
        self.down_proj = nn.Linear(
            config.intermediate_size + config.inserted_intermediate_size, config.inserted_hidden_size, bias=bias
        )
        self.act_fn = act_fn

    def forward(self, normed: torch.Tensor, inserted_normed: torch.Tensor, original_units: torch.Tensor):
        gate, up = self.gate_up_proj(join_streams(normed, inserted_normed)).chunk(2, dim=-1)
        return self.down_proj(torch.cat([original_units, self.act_fn(gate) * up], dim=-1))


class OtterInsertedUngatedMLP(nn.Module):
    """The inserted units of one layer of an MLP without a gate (GPT-2): up reads both streams, down reads all
    units."""

    def __init__(self, config, bias: bool, act_fn: Callable):
        super().__init__()
        input_size = config.hidden_size + config.inserted_hidden_size
        self.up_proj = nn.Linear(input_size, config.inserted_intermediate_size, bias=bias)
        self.down_proj = nn.Linear(
            config.intermediate_size + config.inserted_intermediate_size, config.inserted_hidden_size, bias=bias
        )
        self.act_fn = act_fn

    def forward(self, normed: torch.Tensor, inserted_normed: torch.Tensor, original_units: torch.Tensor):
        units = self.act_fn(self.up_proj(join_streams(normed, inserted_normed)))
        return self.down_proj(torch.cat([original_units, units], dim=-1))


class OtterDecoderLayerMixin:
    """Turns an architecture's decoder layer into an Otter layer.

    The forward here holds the stream maths of every architecture: norms whose statistics come from the original
    stream, the original attention and MLP steps on the original stream, the inserted heads and units beside
    them, each module's output added to its own stream. The architecture's layer class declares what differs:

    - `inserted_mlp_class`: `OtterInsertedMLP` (gated, the default) or `OtterInsertedUngatedMLP`;
    - `norm_class`, the Otter norm matching the base norm, and the names of the base layer's norms it replaces:
      `attention_norm` and `mlp_norm` before each module, `attention_output_norm` and `mlp_output_norm` on each
      module's output (Gemma's sandwich norms) or None;
    - `rotary_fn` and `eager_attention_fn`, the architecture's own functions;
    - `copy_sources`: the base projections that copy-initialisation reads, by role (see `copy_source`);
    - the hooks below, whose defaults are Llama's: `project_heads`, `normalize_query_key` (and through it
      `prepare_inserted_query_key`), `original_attention`, `original_mlp`, `mlp_activation`,
      `attention_sliding_window`, `copy_source`.
    """

    norm_class: type[OtterNorm] = OtterRMSNorm
    inserted_mlp_class: type[nn.Module] = OtterInsertedMLP
    attention_norm: str = "input_layernorm"
    attention_output_norm: str | None = None
    mlp_norm: str = "post_attention_layernorm"
    mlp_output_norm: str | None = None
    rotary_fn: Callable
    eager_attention_fn: Callable
    copy_sources: dict[str, str] = {
        "query": "self_attn.q_proj",
        "key": "self_attn.k_proj",
        "value": "self_attn.v_proj",
        "output": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.config = config  # Llama's layer does not keep it; Gemma's does
        for name in (self.attention_norm, self.attention_output_norm, self.mlp_norm, self.mlp_output_norm):
            if name is not None:
                setattr(self, name, self.norm_class.from_config(config))
        self.inserted_attn = OtterInsertedAttention(
            config,
            layer_idx,
            qkv_bias=self.copy_source("query")[1] is not None,
            output_bias=self.copy_source("output")[1] is not None,
        )
        self.inserted_mlp = self.inserted_mlp_class(
            config, bias=self.copy_source("up")[1] is not None, act_fn=self.mlp_activation()
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        detach_original_stream: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        original, inserted = split_streams(hidden_states, self.config.hidden_size)
        if detach_original_stream:
            # Joining the streams makes autograd see the original one as depending on the inserted parameters;
            # it does not, and cutting it here keeps backward out of the frozen base computation.
            original = original.detach()
        if inserted is None:  # inserted stream switched off: the base layer, at base cost
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager_attention_fn)

        normed, inserted_normed = getattr(self, self.attention_norm).normalize(original, inserted)
        original_heads, attention_output = self.original_attention(
            normed, position_embeddings, attention_mask, past_key_values, attention_fn, **kwargs
        )
        inserted_output = self.inserted_attn(
            normed,
            inserted_normed,
            original_heads,
            prepare_query_key=lambda query, key: self.prepare_inserted_query_key(query, key, position_embeddings),
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            attention_fn=attention_fn,
            # The inserted heads attend like the original ones: same scale, same window.
            scaling=self.self_attn.scaling,
            sliding_window=self.attention_sliding_window(),
            **kwargs,
        )
        original, inserted = self._add_outputs(
            original, inserted, attention_output, inserted_output, self.attention_output_norm
        )

        normed, inserted_normed = getattr(self, self.mlp_norm).normalize(original, inserted)
        original_units, mlp_output = self.original_mlp(normed)
        inserted_output = self.inserted_mlp(normed, inserted_normed, original_units)
        original, inserted = self._add_outputs(original, inserted, mlp_output, inserted_output, self.mlp_output_norm)
        return join_streams(original, inserted)

    def _add_outputs(self, original, inserted, output, inserted_output, output_norm: str | None):
        """Each stream plus its module's output, normalised first where the architecture norms module outputs."""
        if output_norm is not None:
            output, inserted_output = getattr(self, output_norm).normalize(output, inserted_output)
        return original + output, inserted + inserted_output

    # -- architecture hooks (Llama's by default) --------------------------------------------------------------

    def project_heads(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The original query, key and value heads `(batch, heads, seq, head_dim)`, as the base attention forms
        them before rotary embeddings."""
        attention = self.self_attn
        hidden_shape = (*normed.shape[:-1], -1, attention.head_dim)
        query = attention.q_proj(normed).view(hidden_shape).transpose(1, 2)
        key = attention.k_proj(normed).view(hidden_shape).transpose(1, 2)
        value = attention.v_proj(normed).view(hidden_shape).transpose(1, 2)
        return query, key, value

    def normalize_query_key(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the architecture does to query and key heads before rotary embeddings (Qwen3, Gemma 3: q/k norms)."""
        return query, key

    def prepare_inserted_query_key(self, query, key, position_embeddings):
        """The inserted heads' queries and keys, treated as the original heads' are."""
        query, key = self.normalize_query_key(query, key)
        return self.rotary_fn(query, key, *position_embeddings)

    def attention_sliding_window(self) -> int | None:
        """The window the base attention passes to the attention function (None: full attention)."""
        return getattr(self.self_attn, "sliding_window", None)

    def original_attention(self, normed, position_embeddings, attention_mask, past_key_values, attention_fn, **kwargs):
        """The base attention, step for step, also returning the heads' outputs that the inserted heads read."""
        attention = self.self_attn
        query, key, value = self.project_heads(normed)
        query, key = self.rotary_fn(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, attention.layer_idx)
        heads, _ = attention_fn(
            attention,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not attention.training else attention.attention_dropout,
            scaling=attention.scaling,
            sliding_window=self.attention_sliding_window(),
            **kwargs,
        )
        heads = heads.reshape(*normed.shape[:-1], -1).contiguous()
        return heads, attention.o_proj(heads)

    def mlp_activation(self) -> Callable:
        """The base MLP's activation, which the inserted units use too."""
        return self.mlp.act_fn

    def original_mlp(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The base gated MLP, returning its units (what the inserted units read) and its output."""
        mlp = self.mlp
        units = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
        return units, mlp.down_proj(units)

    def copy_source(self, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight `(out_features, in_features)` and bias of the base projection playing `role` (query, key,
        value, output, gate, up, down), which copy-initialisation and the inserted modules' biases follow."""
        projection = self.get_submodule(self.copy_sources[role])
        return projection.weight, projection.bias


class OtterModelMixin:
    """Builds an architecture's decoder stack from Otter layers; its forward is the architecture's own.

    The architecture's model class declares `decoder_layer_class`, `rotary_embedding_class` and `embedding_class`
    (built from the config); the final norm is the decoder layer's `norm_class`.
    """

    decoder_layer_class: type
    rotary_embedding_class: type
    embedding_class: type = OtterEmbedding

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = self.embedding_class(config)
        self.layers = nn.ModuleList(
            [self.decoder_layer_class(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = self.decoder_layer_class.norm_class.from_config(config)
        self.rotary_emb = self.rotary_embedding_class(config=config)
        self.gradient_checkpointing = False
        # Set by the base __init__ of Qwen2 and Mistral, whose forward reads it.
        self.has_sliding_layers = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        self.post_init()

    def otter_decoder_layers(self) -> list[OtterDecoderLayerMixin]:
        return list(self.layers)


@dataclass
class OtterCausalLMOutput(ModelOutput):
    """
    The fields every Otter causal LM returns; `OtterCausalLMOutputWithValue` adds one per inserted head.

    loss (`torch.FloatTensor`, *optional*):
        Language-modelling loss of the original logits, when `labels` are given.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        The base model's logits, bit-identical to running the base model alone.
    past_key_values (`Cache`, *optional*):
        Original and inserted keys and values.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The original stream's hidden states, as the base model returns them.
    inserted_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The inserted stream's hidden states at the same points.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Attention weights, from the base computation inside `otter_disabled()` only.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    inserted_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# The output of every Otter causal LM: the fields above, then each inserted head's output field.
OtterCausalLMOutputWithValue = make_dataclass(
    "OtterCausalLMOutputWithValue",
    [(head.output_field, torch.FloatTensor | None, field(default=None)) for head in INSERTED_HEADS],
    bases=(OtterCausalLMOutput,),
    namespace={"__module__": __name__},
)
OtterCausalLMOutputWithValue.__doc__ = OtterCausalLMOutput.__doc__.split("\n", 2)[2].rstrip(" ") + "".join(
    f"    {head.output_field} {head.output_doc}\n".replace("\n    ", "\n        ") for head in INSERTED_HEADS
)


class OtterForCausalLMMixin:
    """The Otter causal LM with value head: the architecture's causal LM, its backbone widened, plus the inserted
    heads of `INSERTED_HEADS` (`v_head`, and those its config asks for)."""

    backbone_class: type
    _keep_in_fp32_modules_strict = [head.attribute for head in INSERTED_HEADS if head.keep_in_fp32]
    # Auto class name -> the Otter class it loads, filled in by `otter_hf.modeling`: a saved checkpoint ships
    # their code and maps them in `auto_map`, so it loads through each of these Auto classes with
    # trust_remote_code where otter_hf is not installed.
    auto_map_classes: dict[str, type] = {}

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        setattr(self, self.base_model_prefix, self.backbone_class(config))
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for head in INSERTED_HEADS:
            setattr(self, head.attribute, head.module_class(config) if head.is_built(config) else None)
        self.post_init()
        self.freeze_base_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = load_verified(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)
        # Loading swaps in fresh parameters, which come back trainable.
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_base_parameters()
        return loaded

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OtterEmbeddingMixin):
            init.normal_(module.inserted_weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, OtterNorm):
            init.constant_(module.inserted_weight, module.neutral_weight)
            if isinstance(module, OtterLayerNorm):
                init.zeros_(module.inserted_bias)

    # -- inserted parameters -------------------------------------------------------------------------------

    def freeze_base_parameters(self) -> None:
        """Freeze every original parameter; only the inserted ones (inserted heads included) stay trainable."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(is_inserted_parameter(name))

    def otter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.named_parameters() if is_inserted_parameter(name))

    def otter_state_dict(self) -> dict[str, torch.Tensor]:
        """The inserted parameters and the inserted modules' persistent buffers (a draft vocabulary's token ids):
        everything `save_otter` writes."""
        state = dict(self.otter_named_parameters())
        persistent_buffers = self.state_dict(keep_vars=True).keys()
        state.update(
            (name, buffer)
            for name, buffer in self.named_buffers()
            if is_inserted_parameter(name) and name in persistent_buffers
        )
        return state

    def otter_parameters(self) -> Iterator[nn.Parameter]:
        return (parameter for _, parameter in self.otter_named_parameters())

    def num_inserted_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.otter_parameters())

    def num_base_parameters(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if not is_inserted_parameter(name))

    def inserted_parameter_fraction(self) -> float:
        """Inserted parameters as a fraction of the base model's parameters."""
        return self.num_inserted_parameters() / self.num_base_parameters()

    def _original_stream_requires_grad(self, inputs_embeds: torch.Tensor | None) -> bool:
        """Whether anything upstream of the original stream can take a gradient (normally not: the base is frozen)."""
        if inputs_embeds is not None and inputs_embeds.requires_grad:
            return True
        return any(p.requires_grad for name, p in self.named_parameters() if not is_inserted_parameter(name))

    def compute_draft_logits(self, hidden: torch.Tensor, inserted_hidden: torch.Tensor) -> torch.Tensor:
        """Draft-head logits (..., num_draft_heads, vocab_size) from final (post-norm) hidden states of both streams."""
        return self.logits_from_hidden(self.draft_heads(hidden, inserted_hidden))

    def token_embeddings(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Rows of the base model's input embedding matrix (unscaled, without the inserted columns)."""
        return nn.functional.embedding(input_ids, self.get_input_embeddings().weight)

    def otter_decoder_layers(self) -> list:
        """The Otter decoder layers, first to last."""
        return self.base_model.otter_decoder_layers()

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the architecture's causal LM does to the LM head's output (Gemma: final-logit softcapping)."""
        return logits

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The original logits for final (post-norm) original-stream hidden states, as the base causal LM gives them."""
        return self.process_logits(self.lm_head(hidden))

    @property
    def otter_enabled(self) -> bool:
        """Whether the inserted stream runs (False inside `otter_disabled()`)."""
        return self.get_input_embeddings().inserted_enabled

    def final_streams(self, **inputs) -> tuple[torch.Tensor, torch.Tensor | None, ModelOutput]:
        """Run the decoder alone (no LM head, no inserted heads) on `inputs` and return the final (post-norm)
        original and inserted hidden states (None inside `otter_disabled()`), and the decoder's output."""
        outputs = self.base_model(**inputs)
        hidden_states, inserted_hidden = split_streams(outputs.last_hidden_state, self.config.hidden_size)
        return hidden_states, inserted_hidden, outputs

    def base_weights_fingerprint(self) -> str:
        return base_weights_fingerprint(
            (name, parameter) for name, parameter in self.named_parameters() if not is_inserted_parameter(name)
        )

    @contextlib.contextmanager
    def otter_disabled(self):
        """Run the base computation only, at base cost: no value, no inserted keys and values cached."""
        # Every embedding that adds inserted columns (GPT-2 has token and position embeddings).
        embeddings = [module for module in self.modules() if isinstance(module, OtterEmbeddingMixin)]
        previous = [embedding.inserted_enabled for embedding in embeddings]
        for embedding in embeddings:
            embedding.inserted_enabled = False
        try:
            yield self
        finally:
            for embedding, enabled in zip(embeddings, previous):
                embedding.inserted_enabled = enabled

    # -- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> OtterCausalLMOutputWithValue:
        r"""
        The causal LM's forward, plus the outputs of the inserted heads. A head whose output is computed only on
        request takes `output_<field>=True` (`output_draft_logits=True` for the draft heads' `draft_logits`).
        """
        requested_heads = [
            head
            for head in INSERTED_HEADS
            if head.computed_by_default or kwargs.pop(head.request_argument, False)
        ]
        inserted_enabled = self.otter_enabled
        if inserted_enabled:
            if output_attentions:
                raise ValueError(
                    "Otter layers do not record attention weights; run the base computation inside "
                    "`with model.otter_disabled():` to get them."
                )
            if inputs_embeds is not None and inputs_embeds.shape[-1] != self.config.hidden_size + self.config.inserted_hidden_size:
                raise ValueError(
                    f"`inputs_embeds` must carry both streams (last dimension {self.config.hidden_size} + "
                    f"{self.config.inserted_hidden_size}); build them with `model.get_input_embeddings()(input_ids)`."
                )
            if use_cache is None:
                use_cache = self.config.use_cache
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=self.config)
            if past_key_values is not None:
                ensure_inserted_cache_layers(past_key_values, self.config)
            if torch.is_grad_enabled() and not self._original_stream_requires_grad(inputs_embeds):
                kwargs["detach_original_stream"] = True
        elif output_attentions is not None:
            kwargs["output_attentions"] = output_attentions

        hidden_states, inserted_hidden, outputs = self.final_streams(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        # Contiguous, so the LM head runs the matmul a base model with trainable weights runs: for a 3D input that
        # needs a copy to fold into 2D, torch folds it only when the weight requires grad, and the frozen LM head
        # would otherwise take a batched matmul that rounds differently (prefill with logits_to_keep, batch > 1).
        kept_hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep).contiguous()
        logits = self.logits_from_hidden(kept_hidden_states)
        head_outputs = self._inserted_head_outputs(
            requested_heads,
            FinalStreams(
                hidden_states,
                inserted_hidden,
                logits,
                logits_to_keep,
                self.logits_from_hidden,
                input_ids=input_ids,
                token_embeddings=self.token_embeddings,
            ),
        )

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        all_hidden_states = all_inserted_hidden_states = None
        if outputs.hidden_states is not None:
            streams = [split_streams(state, self.config.hidden_size) for state in outputs.hidden_states]
            all_hidden_states = tuple(original for original, _ in streams)
            if inserted_enabled:
                all_inserted_hidden_states = tuple(inserted for _, inserted in streams)

        return OtterCausalLMOutputWithValue(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=all_hidden_states,
            inserted_hidden_states=all_inserted_hidden_states,
            attentions=outputs.attentions,
            **head_outputs,
        )

    def _inserted_head_outputs(self, requested_heads: list, streams: FinalStreams) -> dict[str, torch.Tensor]:
        """The output field of each requested head that this model built, while the inserted stream runs."""
        outputs = {}
        for head in requested_heads:
            module = getattr(self, head.attribute)
            if module is not None and streams.inserted_hidden_states is not None:
                outputs[head.output_field] = module.predict(streams)
            elif not head.computed_by_default:
                raise ValueError(
                    f"`{head.request_argument}=True` needs {head.description} and the inserted stream switched on."
                )
        return outputs

    # -- generation ----------------------------------------------------------------------------------------

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor: LogitsProcessorList | None = None,
        *args,
        token_reward_weight: float | None = None,
        reward_weight: float | None = None,
        reward_top_k: int | None = None,
        **kwargs,
    ):
        r"""
        transformers' `generate()`, plus guidance by the in-model reward through plain arguments.

        Args:
            token_reward_weight (`float`, *optional*):
                Decode from `logits + token_reward_weight * log_softmax(token_reward_logits)`, both from the same
                forward (needs `token_reward_head=True`). Works with every decoding strategy that runs one forward
                per step: greedy, sampling with its warpers, beam search, streamers. 0 decodes exactly as the base
                model, at its cost.
            reward_weight (`float`, *optional*):
                ARGS guidance by the value head: the `reward_top_k` best tokens of each step are rescored as
                `score + reward_weight * value`, in one forward of the candidates over the shared cache
                (`otter_hf.generation.reward_guided_generate`, which needs otter_hf installed).
            reward_top_k (`int`, *optional*, defaults to 10): candidates rescored per step with `reward_weight`.

        The other arguments are `GenerationMixin.generate`'s.
        """
        check_generation_arguments(self, inputs, kwargs, reward_weight, token_reward_weight, reward_top_k)
        if reward_weight is not None or reward_top_k is not None:
            if token_reward_weight is not None:
                raise ValueError(
                    "Pass either `token_reward_weight` (the token-level reward head) or `reward_weight` (ARGS with "
                    "the value head), not both."
                )
            if reward_weight is None:
                raise ValueError("`reward_top_k` sets ARGS guidance; pass `reward_weight=...` with it.")
            if kwargs.get("custom_generate") is None:
                try:
                    from otter_hf.generation import reward_guided_generate
                except ImportError as error:
                    raise ImportError(
                        "ARGS guidance (`reward_weight=...`) runs the decoding loop of otter_hf: `pip install otter-hf`."
                    ) from error
                kwargs["custom_generate"] = reward_guided_generate
            # Passed on as the decoding loop's own arguments (also to a `custom_generate` the caller names).
            kwargs["reward_weight"] = reward_weight
            if reward_top_k is not None:
                kwargs["reward_top_k"] = reward_top_k
            return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)
        if token_reward_weight is None:
            return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)

        if self.token_reward_head is None:
            raise ValueError(
                "`token_reward_weight` needs a token-level reward head: insert with "
                "`otter_hf.insert(base, token_reward_head=True)` and train it with `OtterTokenRewardTrainer`."
            )
        if token_reward_weight == 0:
            with self.otter_disabled():
                return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)
        if not self.otter_enabled:
            raise ValueError("The inserted stream is switched off (`otter_disabled()`); token-reward guidance needs it on.")
        with token_reward_guidance(self, token_reward_weight) as guidance:
            processors = LogitsProcessorList([*(logits_processor or []), guidance])
            return super().generate(inputs, generation_config, processors, *args, **kwargs)

    # -- saving --------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the modeling files and `auto_map` for `trust_remote_code`.

        The files it writes replace the previous ones as a unit (an interrupted save leaves the previous
        checkpoint), its stale weight files go, and other files in the folder, such as a tokenizer, stay; see
        `otter_hf.modeling.persistence`.
        """
        check_finite_inserted_weights(self.otter_state_dict().items(), f"save {save_directory}")
        if kwargs.get("push_to_hub"):
            save_remote_code(self, save_directory)
            return super().save_pretrained(save_directory, *args, **kwargs)
        with replace_files(save_directory, stale=weight_files_of(kwargs.get("variant"))) as staging:
            save_remote_code(self, staging)
            super().save_pretrained(staging, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload weights, config, modeling code and an Otter model card to `repo_id` in one commit.

        See `otter_hf.hub.push_to_hub` for the options (`otter_only`, the card's `trained_on`, `metrics`,
        `overhead`, ...). This file also runs as remote code where otter_hf is not installed; there the upload
        is transformers' own, with its generic model card.
        """
        try:
            from otter_hf.hub import push_to_hub
        except ImportError:
            return super().push_to_hub(repo_id, **kwargs)
        return push_to_hub(self, repo_id, **kwargs)

    def save_otter(self, save_directory) -> None:
        """Write only the inserted parameters (safetensors) and a config naming the base model and the
        fingerprint of its weights; `otter_hf.load_otter(base, save_directory)` attaches them again."""
        check_finite_inserted_weights(self.otter_state_dict().items(), f"save {save_directory}")
        self.config.base_model_fingerprint = self.base_weights_fingerprint()
        save_inserted_parameters(save_directory, self.otter_state_dict().items(), self.config)
