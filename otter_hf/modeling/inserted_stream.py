"""The inserted stream, computed beside the base model's own forward from what its modules hand to hooks.

The original stream is the base model's computation, run as transformers wrote it: its model and decoder-layer
forwards, its attention implementation and cache, in whatever dtype. Nothing in it reads the inserted stream, so
Otter only observes it, at the module boundaries an architecture's `OtterLayout` names (the *capture points*):

- the token (and position) embeddings: their inputs, which the inserted stream embeds with its own columns;
- each norm: its input gives the statistics (`rms(h)`, or mean and variance) that normalise the inserted stream
  too, its output is the normalised original stream `h_n`;
- the attention module's call: the mask, rotary embeddings and cache the layer uses;
- the input of the attention output projection: the original heads;
- the input of the MLP down projection: the original units;
- the end of each decoder layer, where the inserted layer runs on what the layer captured, and the final norm.

Per decoder layer, with `g` the inserted stream (see `otter-design.md`):

    g_n = w' * g / rms(h)                       (the original stream's statistics, the inserted weight)
    q', k', v' = A [h_n, g_n];  g += O [heads, heads']
    u' = act(G [h_n, g_n]) * (U [h_n, g_n]);  g += D [units, u']

This file imports only torch and transformers, so it ships with a checkpoint as remote code.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicCache, get_layer_types_and_kwargs

from .configuration_otter import attention_head_size

# transformers 5.25 renamed the cache argument of attention modules from `past_key_values` to `cache`.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")
# What the inserted heads do not pass on to the attention function: the arguments they take themselves.
_OWN_ATTENTION_ARGUMENTS = frozenset({"hidden_states", "position_embeddings", "attention_mask", *CACHE_ARGUMENT_NAMES})


class InsertedRMSNorm:
    """Llama's RMSNorm, `w * x / rms(x)` cast back to the input dtype before the weight, on the inserted stream:
    `rms` is the original stream's, the weight the inserted one."""

    neutral_weight = 1.0
    has_bias = False

    @staticmethod
    def statistics(original: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # `rsqrt(mean(x²) + eps)` in three operations: one float32 reduction, then `eps + norm² / n` at once. At a
        # decode step these are tiny tensors, where each operation's dispatch is what costs.
        norm = torch.linalg.vector_norm(original, dim=-1, keepdim=True, dtype=torch.float32)
        return torch.addcmul(eps, norm, norm, value=1.0 / original.shape[-1]).rsqrt_()

    @staticmethod
    def normalize(norm: nn.Module, inverse_rms: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
        if inserted.dtype == torch.float32:  # the casts below are identities; skip their dispatch
            return norm.inserted_weight * (inserted * inverse_rms)
        return norm.inserted_weight * (inserted.to(torch.float32) * inverse_rms).to(inserted.dtype)


class InsertedGemmaRMSNorm(InsertedRMSNorm):
    """Gemma's RMSNorm, `x / rms(x) * (1 + w)` in float32; a zero weight leaves the stream unscaled."""

    neutral_weight = 0.0

    @staticmethod
    def normalize(norm, inverse_rms, inserted):
        return (inserted.float() * inverse_rms * (1.0 + norm.inserted_weight.float())).type_as(inserted)


class InsertedLayerNorm:
    """LayerNorm with bias (GPT-2): the inserted stream is centred and scaled by the original stream's mean and
    variance, then takes its own weight and bias."""

    neutral_weight = 1.0
    has_bias = True

    @staticmethod
    def statistics(original, eps):
        variance, mean = torch.var_mean(original, dim=-1, keepdim=True, correction=0)
        return mean, torch.rsqrt(variance + eps)

    @staticmethod
    def normalize(norm, statistics, inserted):
        mean, inverse_std = statistics
        return (inserted - mean) * inverse_std * norm.inserted_weight + norm.inserted_bias


def linear_copy_source(layer: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `(weight [out, in], bias)` of the projection playing `role` in a Llama-style decoder layer."""
    projection = layer.get_submodule(LINEAR_COPY_SOURCES[role])
    return projection.weight, projection.bias


LINEAR_COPY_SOURCES = {
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "output": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


class HalfRotation:
    """Rotary embeddings as Llama applies them, `x * cos + rotate_half(x) * sin`, on the first `cos.shape[-1]`
    channels of each head (all of them, or Phi-3's partial rotary), with the tables the base attention received.

    The inserted heads rotate their queries and keys as one tensor, and `rotate_half(x) * sin` is taken as
    `roll(x) * signed_sin`, the same products: four operations per layer where the base function spends fourteen.
    """

    @staticmethod
    def tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, signed_sin)` broadcast over heads, once per forward for every layer that shares the embeddings."""
        half = sin.shape[-1] // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos.unsqueeze(1), signed_sin.unsqueeze(1)

    @staticmethod
    def rotate(states: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`states` (batch, heads, positions, head_dim), rotated."""
        cos, signed_sin = tables
        rotary_dim = cos.shape[-1]
        if rotary_dim == states.shape[-1]:
            return states * cos + states.roll(rotary_dim // 2, dims=-1) * signed_sin
        rotated, passed = states[..., :rotary_dim], states[..., rotary_dim:]
        rotated = rotated * cos + rotated.roll(rotary_dim // 2, dims=-1) * signed_sin
        return torch.cat([rotated, passed], dim=-1)


def attention_sliding_window(attention: nn.Module) -> int | None:
    """The window a base attention module passes to its attention function (None: full attention)."""
    return getattr(attention, "sliding_window", None)


@dataclass(frozen=True)
class OtterLayout:
    """Where an architecture's base modules hand Otter what the inserted stream reads: an architecture as data.

    Paths are attribute paths: in the backbone for the embeddings, the decoder layers and the final norm; in a
    decoder layer for the rest. Llama's are the defaults.
    """

    # The architecture's own eager attention, and how the inserted heads take the rotary embeddings the base
    # attention receives (None: positions are embedded).
    eager_attention_fn: Callable
    rotary: type | None = HalfRotation
    # How the inserted stream is normalised with the original stream's statistics, and the config field of eps.
    norm: type = InsertedRMSNorm
    norm_eps: str = "rms_norm_eps"
    # In the backbone.
    layers: str = "layers"
    token_embedding: str = "embed_tokens"
    position_embedding: str | None = None
    final_norm: str = "norm"
    # In a decoder layer: the norms before each module, and on each module's output (Gemma's sandwich norms).
    attention_norm: str = "input_layernorm"
    attention_output_norm: str | None = None
    mlp_norm: str = "post_attention_layernorm"
    mlp_output_norm: str | None = None
    attention: str = "self_attn"
    # The modules whose inputs are the original heads and the original units.
    attention_output: str = "self_attn.o_proj"
    mlp_output: str = "mlp.down_proj"
    mlp_activation: str = "mlp.act_fn"
    gated_mlp: bool = True
    # Norms the base attention applies to every query and key head (Qwen3, Gemma 3), by path in the attention.
    query_key_norms: tuple[str, str] | None = None
    sliding_window: Callable[[nn.Module], int | None] = attention_sliding_window
    # (decoder layer, role) -> the (weight [out, in], bias) that copy-initialisation reads for role query, key,
    # value, output, gate, up or down.
    copy_source: Callable[[nn.Module, str], tuple[torch.Tensor, torch.Tensor | None]] = linear_copy_source

    def norm_paths(self) -> tuple[str, ...]:
        return tuple(
            path
            for path in (self.attention_norm, self.attention_output_norm, self.mlp_norm, self.mlp_output_norm)
            if path is not None
        )


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


class OtterInsertedAttention(nn.Module):
    """The inserted attention heads of one layer.

    Queries, keys and values read both streams (`[h_n, g_n]`); the output, added to the inserted stream only,
    reads the original heads' outputs and the inserted heads' outputs. The heads attend as the base attention
    module does: its rotary embeddings, q/k norms, scale, window, mask and attention implementation.
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
        base_attention: nn.Module,
        attention_kwargs: dict,
        layout: OtterLayout,
        stream: "InsertedStream",
    ) -> torch.Tensor:
        input_shape = normed.shape[:-1]
        qkv = self.qkv_proj(torch.cat([normed, inserted_normed], dim=-1)).view(*input_shape, -1, self.head_dim)
        query_key, value = qkv.transpose(1, 2).split(
            [self.num_heads + self.num_key_value_heads, self.num_key_value_heads], dim=1
        )
        if layout.query_key_norms is not None:
            query, key = query_key.split([self.num_heads, self.num_key_value_heads], dim=1)
            query_norm, key_norm = (base_attention.get_submodule(path) for path in layout.query_key_norms)
            query_key = torch.cat([query_norm(query), key_norm(key)], dim=1)
        if layout.rotary is not None:
            query_key = layout.rotary.rotate(query_key, stream.rotary_tables(layout.rotary, attention_kwargs))
        query, key = query_key.split([self.num_heads, self.num_key_value_heads], dim=1)
        cache = next(
            (attention_kwargs[name] for name in CACHE_ARGUMENT_NAMES if attention_kwargs.get(name) is not None), None
        )
        if cache is not None:
            ensure_inserted_cache_layers(cache, self.config)
            key, value = cache.update(key, value, self.layer_idx)
        heads, _ = stream.attention_fn(
            self,
            query,
            key,
            value,
            attention_kwargs.get("attention_mask"),
            dropout=0.0 if not self.training else self.attention_dropout,
            # The inserted heads attend like the original ones: same scale, same window.
            scaling=base_attention.scaling,
            sliding_window=layout.sliding_window(base_attention),
            **{name: value for name, value in attention_kwargs.items() if name not in _OWN_ATTENTION_ARGUMENTS},
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
        gate, up = self.gate_up_proj(torch.cat([normed, inserted_normed], dim=-1)).chunk(2, dim=-1)
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
        units = self.act_fn(self.up_proj(torch.cat([normed, inserted_normed], dim=-1)))
        return self.down_proj(torch.cat([original_units, units], dim=-1))


class CapturePointMissed(RuntimeError):
    """A base module the inserted stream reads was not called as the architecture's layout says."""

    def __init__(self, path: str):
        super().__init__(
            f"Otter reads the base model at `{path}`, but that module was not called during this forward "
            f"(transformers {transformers.__version__}): this transformers version computes the layer differently "
            "from what otter_hf was written for, so the inserted stream cannot follow it. Nothing was returned "
            "rather than a wrong value; install a transformers version otter_hf supports (see its README)."
        )


class InsertedStream:
    """The inserted stream `g` through one forward of the base model, and what the running layer has captured."""

    def __init__(self, compute_grad: bool, record_hidden_states: bool, norm_eps: float, attention_fn: Callable):
        # Whether the inserted computation builds a graph (the base runs without one while training).
        self.compute_grad = compute_grad
        # Read once per forward rather than at every capture: the norms' eps, the attention implementation.
        self._norm_eps = norm_eps
        self._norm_eps_tensors: dict[torch.device, torch.Tensor] = {}
        self.attention_fn = attention_fn
        # id(cos) -> (cos, the rotation's tables): computed once for all layers that receive the same embeddings.
        self._rotary_tables: dict[int, tuple[torch.Tensor, tuple]] = {}
        self.hidden: torch.Tensor | None = None
        # Capture point path -> what its hook recorded, for the decoder layer running now.
        self.captured: dict[str, tuple] = {}
        self.layers_run = 0
        # The inserted stream entering each decoder layer, then after the final norm (as transformers records the
        # original stream's hidden states), when asked for.
        self.hidden_states: list[torch.Tensor] | None = [] if record_hidden_states else None
        # After the final norm: both streams, every position.
        self.final_original: torch.Tensor | None = None
        self.final_inserted: torch.Tensor | None = None

    def norm_eps(self, device: torch.device) -> torch.Tensor:
        """The norms' eps as a float32 scalar tensor on `device`, which the statistics add in one operation."""
        eps = self._norm_eps_tensors.get(device)
        if eps is None:
            eps = self._norm_eps_tensors[device] = torch.tensor(self._norm_eps, dtype=torch.float32, device=device)
        return eps

    def rotary_tables(self, rotary: type, attention_kwargs: dict) -> tuple:
        """The rotation's tables for the rotary embeddings a base attention module received."""
        cos, sin = attention_kwargs["position_embeddings"]
        cached = self._rotary_tables.get(id(cos))
        if cached is None or cached[0] is not cos:
            cached = self._rotary_tables[id(cos)] = (cos, rotary.tables(cos, sin))
        return cached[1]

    def grad_mode(self):
        """Where the inserted stream is computed inside the base's forward: with autograd when it trains."""
        return torch.enable_grad() if self.compute_grad else contextlib.nullcontext()

    def add_embedding(self, embedding: torch.Tensor) -> None:
        self.hidden = embedding if self.hidden is None else self.hidden + embedding

    def take(self, path: str, layer_path: str) -> tuple:
        if path not in self.captured:
            raise CapturePointMissed(f"{layer_path}.{path}")
        return self.captured.pop(path)
