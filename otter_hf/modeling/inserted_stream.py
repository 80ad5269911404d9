"""The inserted stream, computed beside the base model's own forward from what its modules hand to hooks.

The original stream is the base model's computation, run as transformers wrote it: its model and decoder-layer
forwards, its attention implementation and cache, in whatever dtype. Nothing in it reads the inserted stream, so
Otter only observes it, at the module boundaries an architecture's `OtterLayout` names (the *capture points*):

- the token (and position) embeddings: their inputs, which the inserted stream embeds with its own columns;
- each norm: its input gives the statistics (`rms(h)`, or mean and variance) that normalise the inserted stream
  too, its output is the normalised original stream `h_n`;
- the attention module's call: the mask, rotary embeddings and cache the layer uses; a hybrid family's
  linear-attention layer has no inserted heads, and its linear attention's output is read instead;
- the input of the attention output projection: the original heads;
- the input of the MLP down projection: the original units; in a sparse (mixture-of-experts) layer, whose experts
  are fused parameters with no down projection module, the output of the sparse block instead;
- the end of each decoder layer, where the inserted layer (`inserted_layer.py`, the maths vLLM runs too) updates
  the inserted stream from the layer's `LayerCapture`, and the final norm.

This file imports only torch and transformers, so it ships with a checkpoint as remote code.
"""

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    STATIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicCache,
    StaticCache,
    get_layer_types_and_kwargs,
)

from .configuration_otter import attention_head_size
from .inserted_layer import (
    HalfRotation,
    InsertedRMSNorm,
    LayerCapture,
    NormCapture,
    OtterInsertedAttention,
    OtterLinearAttentionReadout,
    ProjectionNorm,
    RawInput,
)

# transformers 5.25 renamed the cache argument of attention modules from `past_key_values` to `cache`.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")
# What the inserted heads do not pass on to the attention function: the arguments they take themselves (Gemma 4's
# attention takes the keys and values shared across layers as one of its own, too).
_OWN_ATTENTION_ARGUMENTS = frozenset(
    {"hidden_states", "position_embeddings", "attention_mask", "shared_kv_states", *CACHE_ARGUMENT_NAMES}
)


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


def always(attention: nn.Module) -> bool:
    return True


def first_expert_copy_source(experts: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `(weight [out, in], None)` of expert 0's gate or up units in fused experts (`gate_up_proj [E, 2I, H]`,
    the gate units then the up units, as transformers' experts chunk it)."""
    units = experts.gate_up_proj.shape[1] // 2
    start = {"gate": 0, "up": units}[role]
    return experts.gate_up_proj[0, start : start + units], None


def shared_expert_copy_source(
    block_class: type, shared_expert: str = "shared_expert", default=linear_copy_source, mlp: str = "mlp"
):
    """A family's copy source whose sparse layers (a `block_class` MLP, at `mlp` in the decoder layer) copy the gate
    and up units of the block's shared expert (at `shared_expert`), `default` elsewhere. A sparse layer's down is
    not read: the inserted down projection starts as the identity on the block output."""

    def copy_source(layer: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        block = layer.get_submodule(mlp)
        if role in ("gate", "up") and isinstance(block, block_class):
            projection = block.get_submodule(f"{shared_expert}.{role}_proj")
            return projection.weight, projection.bias
        return default(layer, role)

    return copy_source


def gated_query_copy_source(layer: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Llama's projections, where the query projection computes each head's query and then its output gate
    (Qwen3.5, Qwen3-Next: rows `[q_0, gate_0, q_1, gate_1, ...]`, `head_dim` each): role query reads the queries,
    query_gate the gates."""
    if role not in ("query", "query_gate"):
        return linear_copy_source(layer, role)
    weight, bias = linear_copy_source(layer, "query")
    head_dim = layer.get_submodule(LINEAR_COPY_SOURCES["query"].rpartition(".")[0]).head_dim
    part = 0 if role == "query" else 1

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(-1, 2, head_dim, *tensor.shape[1:])[:, part].reshape(-1, *tensor.shape[1:])

    return rows(weight), None if bias is None else rows(bias)


def no_latents(layer: nn.Module) -> tuple[str, ...]:
    return ()


def optional_submodule(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at `path`, or None where the module sets that attribute to None or leaves it unset in this
    layer (Llama 4 has q/k norms in its rotating layers only)."""
    parent, _, name = path.rpartition(".")
    return getattr(module.get_submodule(parent) if parent else module, name, None)


def attention_sliding_window(attention: nn.Module) -> int | None:
    """The window a base attention module passes to its attention function (None: full attention)."""
    return getattr(attention, "sliding_window", None)


@dataclass(frozen=True)
class AttentionShape:
    """The base heads of one attention layer: their size and how many key/value heads they share."""

    head_dim: int
    num_key_value_heads: int


def config_attention_shape(config, layer_index: int) -> AttentionShape:
    """Every layer's heads as the config gives them (Qwen2 configs carry no `head_dim`: the heads split
    `hidden_size` evenly)."""
    return AttentionShape(attention_head_size(config), config.num_key_value_heads)


def per_layer_attention_shape(config, layer_index: int) -> AttentionShape:
    """A layer's heads as the config's `per_layer_config` gives them (Gemma 4: larger heads, and fewer key/value
    heads, in its global layers than in its sliding ones)."""
    return config_attention_shape(config.per_layer_config[layer_index], layer_index)


@dataclass(frozen=True)
class KeyValueSharing:
    """A layer's part in sharing keys and values across layers (Gemma 4): it `stores` its keys and values for
    the later layers of `group` to attend over, or `reuses` those of `group`, projecting queries only."""

    group: str
    stores: bool = False
    reuses: bool = False


def no_key_value_sharing(attention: nn.Module) -> KeyValueSharing | None:
    return None


@dataclass(frozen=True)
class PerLayerInput:
    """A block the base adds to its stream at the end of each decoder layer from a per-layer input (Gemma 4's
    per-layer embeddings): `projection` (in the decoder layer) turns the gated per-layer units, its input, into
    the block's output, which `output_norm` normalises. The inserted stream reads those units through a projection
    of its own (`OtterInsertedPerLayerInput`), normalised with the statistics of `output_norm`."""

    projection: str = "per_layer_projection"
    output_norm: str = "post_per_layer_input_norm"


@dataclass(frozen=True)
class SparseMlp:
    """A mixture-of-experts block: a decoder layer whose module at `path` is a `block_class` is sparse.

    Its experts are fused 3-D parameters, so no module receives their units; the inserted down projection reads
    the block's output (width `hidden_size`) in their place, and the inserted units take the activation at
    `activation`: `act(gate) * up`, or, where the family combines gate and up otherwise (gpt-oss's clamped
    SwiGLU), the rule `gated_units` builds from the module at `activation`.
    """

    block_class: type
    path: str = "mlp"
    activation: str = "mlp.experts.act_fn"
    gated_units: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None
    # Where the base sums the block's output with a dense MLP's before a norm (Gemma 4: routed experts beside an
    # always-on MLP, each with norms of its own, summed into `post_feedforward_layernorm`), that norm's path in the
    # decoder layer: the inserted down projection reads its input, the sum, in place of the block's output.
    combined_output_norm: str | None = None

    def is_sparse(self, layer: nn.Module) -> bool:
        module = layer
        for name in self.path.split("."):
            module = getattr(module, name, None)
        return isinstance(module, self.block_class)


@dataclass(frozen=True)
class MlpReadout:
    """Where the inserted MLP of one decoder layer reads the original units: the input of the module at
    `units_path` (a down projection: the units themselves, or a norm over a sparse layer's summed outputs), or its
    output where `reads_output` (a sparse block); `units_width` wide. `activation` is the module the inserted units
    take their activation from, `gated_units` (where given) the rule that builds from it how gate and up make the
    units. `stream_space`: what is read is an output in the stream's space rather than units, which
    copy-initialisation passes on by the identity. `capture_key`: where the capture is kept, where the module is a
    norm capture point too."""

    units_path: str
    reads_output: bool
    units_width: int
    activation: str
    gated_units: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None
    stream_space: bool = False
    capture_key: str | None = None

    @property
    def key(self) -> str:
        return self.capture_key or self.units_path


@dataclass(frozen=True)
class OtterLayout:
    """Where an architecture's base modules hand Otter what the inserted stream reads: an architecture as data.

    Paths are attribute paths: in the backbone for the embeddings, the decoder layers and the final norm; in a
    decoder layer for the rest. Llama's are the defaults.
    """

    # The architecture's own eager attention, and how the inserted heads take the rotary embeddings the base
    # attention receives (None: positions are embedded): a rule with `tables(*position_embeddings)` and
    # `rotate(states, tables)`, or `rotary_for_config(config)` where a config field chooses it (DeepSeek-V3's
    # `rope_interleave`).
    eager_attention_fn: Callable
    rotary: object | None = HalfRotation
    rotary_for_config: Callable | None = None
    # Whether a base attention module applies the rotary embeddings it receives (SmolLM3 skips them in some
    # layers); the inserted heads of its layer do as it does.
    rotates: Callable[[nn.Module], bool] = always
    # How the inserted stream is normalised with the original stream's statistics, and the config field of eps.
    norm: type = InsertedRMSNorm
    norm_eps: str = "rms_norm_eps"
    # In the backbone.
    layers: str = "layers"
    token_embedding: str = "embed_tokens"
    position_embedding: str | None = None
    final_norm: str = "norm"
    # In a decoder layer: the norms before each module (None: the base feeds the module raw `h`, as OLMo 2/3 do,
    # and the inserted stream enters raw too), and on each module's output (Gemma's sandwich norms, OLMo's).
    attention_norm: str | None = "input_layernorm"
    attention_output_norm: str | None = None
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_output_norm: str | None = None
    attention: str = "self_attn"
    # The MLP module, whose input is read where no norm precedes it.
    mlp: str = "mlp"
    # The modules whose inputs are the original heads and the original units.
    attention_output: str = "self_attn.o_proj"
    mlp_output: str = "mlp.down_proj"
    mlp_activation: str = "mlp.act_fn"
    gated_mlp: bool = True
    # The mixture-of-experts block of a sparse family (None: every layer is dense).
    sparse_mlp: SparseMlp | None = None
    # The linear-attention module of a hybrid family (Gated DeltaNet: `linear_attn`), by path in a decoder layer.
    # A layer holding it has no `attention` module and gets no inserted heads: the inserted stream reads the
    # module's output (`OtterLinearAttentionReadout`), then runs its inserted MLP (see "Linear-attention layers"
    # in README.md).
    linear_attention: str | None = None
    # Whether the base attention gates each head's output with `sigmoid` of a gate its query projection computes
    # (Qwen3.5, Qwen3-Next); the inserted heads then gate theirs too, and copy-initialisation reads role
    # `query_gate`.
    attention_output_gate: bool = False
    # Norms the base attention applies to every query and key head (Qwen3, Gemma 3), by path in the attention, and
    # whether a base attention module has them (GLM-4-MoE's `use_qk_norm`); the inserted heads of its layer do as
    # it does.
    query_key_norms: tuple[str, str] | None = None
    applies_query_key_norms: Callable[[nn.Module], bool] = always
    # Norms the base attention applies over its whole query and key projections (OLMo 2/3), by path in the
    # attention: the inserted heads read their statistics and take their own weights (`ProjectionNorm`).
    query_key_projection_norms: tuple[str, str] | None = None
    # Whether those q/k norms follow the rotation rather than precede it (Llama 4's L2 norm).
    query_key_norms_after_rotation: bool = False
    sliding_window: Callable[[nn.Module], int | None] = attention_sliding_window
    # The base attention's per-head sink logits, by attribute name (gpt-oss's `sinks`): a softmax column of their
    # own that takes attention mass from every position. The inserted heads hold sinks of their own under the same
    # name on the inserted attention, which the base's attention functions read from the module they are handed
    # (eager) or as `s_aux` (kernels); copy-initialisation copies each source head's.
    attention_sinks: str | None = None
    # A factor the base attention applies to its queries by position, as a rule `(attention, positions) -> factor
    # (tokens,) or None` (Llama 4's attention temperature tuning in its layers without rotary embeddings).
    query_scale: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None = None
    # Latent attention (DeepSeek): (decoder layer) -> the paths of the modules whose outputs the inserted heads
    # read beside `h_n` (the normalised query and key/value latents); and (config) -> the query/key and the value
    # head sizes of the inserted heads (None: both the layer's head size, `attention_shape`).
    attention_latents: Callable[[nn.Module], tuple[str, ...]] = no_latents
    head_dims: Callable[[object], tuple[int, int]] | None = None
    # The norm the base attention applies to every value head (Gemma 4), by path in the attention; it holds no
    # weight, so the inserted values take it as it is.
    value_norm: str | None = None
    # (config, layer index) -> the size of that layer's base heads and their number of key/value heads. The inserted
    # heads of a layer take its head size (they take its rotary tables and q/k norms, and copy its heads).
    attention_shape: Callable[[object, int], AttentionShape] = config_attention_shape
    # (base attention) -> whether its layer stores keys and values for later layers or reuses an earlier layer's
    # (Gemma 4); the inserted heads of the layer do the same with the inserted keys and values.
    key_value_sharing: Callable[[nn.Module], KeyValueSharing | None] = no_key_value_sharing
    # The block adding a per-layer input to the stream at the end of each decoder layer (Gemma 4), None where none.
    per_layer_input: PerLayerInput | None = None
    # A buffer of the decoder layer that the base multiplies its whole stream by at the layer's end (Gemma 4's
    # `layer_scalar`); the inserted stream is multiplied alike.
    output_scale: str | None = None
    # (decoder layer, role) -> the (weight [out, in], bias) that copy-initialisation reads for role query, key,
    # value, output, gate, up or down (and query_gate with `attention_output_gate`). In a sparse layer
    # (`sparse_mlp`) gate and up are the first units of the shared expert where the family has one, else of
    # expert 0, and down is not read: the inserted down projection's original-stream block starts as the identity
    # on the first dimensions of the block output.
    copy_source: Callable[[nn.Module, str], tuple[torch.Tensor, torch.Tensor | None]] = linear_copy_source
    # Config fields of multipliers the base applies outside its modules (Granite): to the token embeddings, and to
    # every update of the residual stream. The inserted stream takes them alike.
    embedding_multiplier: str | None = None
    residual_multiplier: str | None = None
    # The config field of a dense layer's MLP units (Llama 4's dense layers: `intermediate_size_mlp`).
    dense_units: str = "intermediate_size"

    def inserted_head_dims(self, config, layer_index: int) -> tuple[int, int]:
        """The query/key and value head sizes of the inserted heads of layer `layer_index`."""
        if self.head_dims is not None:
            return self.head_dims(config)
        head_dim = self.attention_shape(config, layer_index).head_dim
        return head_dim, head_dim

    def rotation(self, config):
        """The rotation rule of the inserted heads for `config` (None: positions are embedded)."""
        return self.rotary_for_config(config) if self.rotary_for_config is not None else self.rotary

    def has_inserted_heads(self, layer: nn.Module) -> bool:
        """Whether `layer` has softmax attention, and so inserted heads (not a linear-attention layer)."""
        if self.linear_attention is None:
            return True
        try:
            layer.get_submodule(self.linear_attention)
        except AttributeError:
            return True
        return False

    def raw_input_modules(self, layer: nn.Module) -> tuple[str, ...]:
        """The modules of `layer` the inserted stream reads that the base feeds raw `h`, no norm before them."""
        modules = ((self.attention_norm, self.attention), (self.mlp_norm, self.mlp))
        if not self.has_inserted_heads(layer):
            modules = modules[1:]
        return tuple(module for norm, module in modules if norm is None)

    def per_layer_input_of(self, layer: nn.Module) -> PerLayerInput | None:
        """The per-layer input block of `layer`, None where the base has none (Gemma 4 without per-layer inputs)."""
        block = self.per_layer_input
        return block if block is not None and isinstance(getattr(layer, block.projection, None), nn.Module) else None

    def norm_paths(self, layer: nn.Module) -> tuple[str, ...]:
        """The norms of `layer` the inserted stream reads (a linear-attention layer's attention norms are not)."""
        attention_norms = (self.attention_norm, self.attention_output_norm) if self.has_inserted_heads(layer) else ()
        per_layer = self.per_layer_input_of(layer)
        per_layer_norm = per_layer.output_norm if per_layer is not None else None
        return tuple(
            path for path in (*attention_norms, self.mlp_norm, self.mlp_output_norm, per_layer_norm) if path is not None
        )

    def mlp_readout(self, layer: nn.Module, config) -> MlpReadout:
        """Where `layer`'s original units are read: its down projection's input in a dense layer, its sparse
        block's output in a sparse one."""
        sparse = self.sparse_mlp
        if sparse is not None and sparse.is_sparse(layer):
            combined = sparse.combined_output_norm
            return MlpReadout(
                combined or sparse.path,
                reads_output=combined is None,
                units_width=config.hidden_size,
                activation=sparse.activation,
                gated_units=sparse.gated_units,
                stream_space=True,
                capture_key=raw_input_key(combined) if combined is not None else None,
            )
        # A linear down projection gives its layer's width (Gemma 4 doubles it in its KV-sharing layers).
        width = getattr(layer.get_submodule(self.mlp_output), "in_features", None) or getattr(config, self.dense_units)
        return MlpReadout(self.mlp_output, reads_output=False, units_width=width, activation=self.mlp_activation)


def base_cache_layers(config) -> int:
    """How many cache layers the base model's own cache has: one per decoder layer, except for the layers that
    reuse earlier layers' keys and values in transformers 5.19 (Gemma 4), which has none for those."""
    return len(get_layer_types_and_kwargs(config)[0])


def inserted_cache_layer_indices(config) -> dict[int, int]:
    """Decoder layer index -> the cache layer of its inserted keys and values: the number of the base cache's own
    layers (`base_cache_layers`) plus k, for the k-th layer whose base cache layer holds keys and values.

    A linear-attention layer (its cache layer holds a recurrent state, no keys) has no inserted heads, and a layer
    reusing an earlier layer's keys and values (Gemma 4's KV sharing: transformers 5.25 gives it a dummy cache layer,
    5.19 none, so the base cache has fewer layers than the model) reuses the earlier layer's inserted ones; neither
    has an inserted cache layer."""
    layer_types, _ = get_layer_types_and_kwargs(config)
    key_value_layers = [index for index, layer_type in enumerate(layer_types) if _caches_keys_and_values(layer_type)]
    return {layer: len(layer_types) + rank for rank, layer in enumerate(key_value_layers)}


def recurrent_cache_layers(config) -> int:
    """How many of the base cache's layers hold a recurrent state (a hybrid's linear-attention layers): neither
    keys and values nor a dummy layer of a layer reusing another's."""
    layer_types, _ = get_layer_types_and_kwargs(config)
    return sum(layer_type != "dummy" and not _caches_keys_and_values(layer_type) for layer_type in layer_types)


def otter_cache_layers(config) -> int:
    """How many layers an Otter model's filled cache holds: the base cache's own, then the inserted ones."""
    return base_cache_layers(config) + len(inserted_cache_layer_indices(config))


def _caches_keys_and_values(layer_type: str) -> bool:
    # transformers' dummy layers (5.25) are no `CacheLayerMixin`, nor are its recurrent-state layers.
    return issubclass(DYNAMIC_LAYER_TYPE_MAPPING[layer_type], CacheLayerMixin)


def ensure_inserted_cache_layers(cache: Cache, config, num_inserted_layers: int) -> None:
    """Give the inserted heads their own cache layers (`inserted_cache_layer_indices`, `num_inserted_layers` of
    them), each of the kind of its decoder layer's (dynamic or static, sliding or full; a static layer with the same
    length).

    Keeping them beside the original layers (rather than inside them) leaves the original keys and values, and a
    hybrid's recurrent states, exactly as the base model stores them, while `crop`, `reorder_cache` and friends
    still reach both.
    """
    if isinstance(cache, DynamicCache):
        if cache.layer_class_to_replicate is not None:
            return  # a cache without a config grows by itself to any layer index
        new_layer = functools.partial(_layer_of_type, DYNAMIC_LAYER_TYPE_MAPPING)
    elif isinstance(cache, StaticCache):
        # The cache's length is its full-attention layers' (a sliding layer holds at most its window; a
        # linear-attention layer holds a recurrent state, no length; a dummy layer, which reuses another layer's keys
        # and values as Gemma 4's KV-sharing layers do, holds none).
        max_cache_len = max(getattr(layer, "max_cache_len", 0) for layer in cache.layers)
        new_layer = functools.partial(_layer_of_type, STATIC_LAYER_TYPE_MAPPING, max_cache_len=max_cache_len)
    else:
        raise ValueError(
            f"Otter models keep their inserted keys and values beside the base's, in a DynamicCache or a StaticCache; "
            f"got {type(cache).__name__}. Pass one of those (or `cache_implementation='dynamic'` / `'static'` to "
            "generate()), or no cache at all."
        )
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    num_layers = len(layer_types)
    if len(cache.layers) == num_layers:
        cache.layers.extend(
            new_layer(layer_type, kwargs)
            for layer_type, kwargs in zip(layer_types, layer_kwargs)
            if _caches_keys_and_values(layer_type)
        )
    elif len(cache.layers) != num_layers + num_inserted_layers:
        raise ValueError(
            f"This cache has {len(cache.layers)} layers; an Otter model whose base caches {num_layers} layers needs "
            f"{num_layers} (a fresh cache) or {num_layers + num_inserted_layers} (one it has already filled)."
        )


def _layer_of_type(mapping: dict, layer_type: str, kwargs: dict, **extra):
    return mapping[layer_type](**kwargs, **extra)


@dataclass
class TransformersHeadsAttention:
    """How one layer's inserted heads attend in transformers (`InsertedHeadsAttention`): with the attention
    function of the model's attention implementation, and the mask, window, scale, q/k norms, rotary embeddings and
    cache the base attention module received. Their keys and values go to the cache's inserted layers (see
    `ensure_inserted_cache_layers`)."""

    heads: OtterInsertedAttention
    base_attention: nn.Module
    attention_kwargs: dict
    # The cache layer of these heads' keys and values (`inserted_cache_layer_indices`), None where they reuse an
    # earlier layer's.
    cache_index: int | None
    stream: "InsertedStream"
    layout: "OtterLayout"
    # What the base attention's projection-wide q/k norms saw, where the layout names them.
    projection_norm_captures: tuple[NormCapture, NormCapture] | None = None

    @property
    def rotary_tables(self):
        rotary = self.layout.rotation(self.stream.config)
        if rotary is None or not self.layout.rotates(self.base_attention):
            return None
        return self.stream.rotary_tables(rotary, self.attention_kwargs)

    @property
    def query_key_norms(self) -> tuple[Callable, Callable | None] | None:
        if self.projection_norm_captures is not None:
            return tuple(ProjectionNorm(self.layout.norm, captured) for captured in self.projection_norm_captures)
        if self.layout.query_key_norms is None or not self.layout.applies_query_key_norms(self.base_attention):
            return None
        # A layer whose module lacks them has none (Llama 4's no-rope layers).
        query_norm, key_norm = (optional_submodule(self.base_attention, path) for path in self.layout.query_key_norms)
        if query_norm is None:
            return None
        # A layer reusing an earlier layer's keys has no key norm of its own.
        if self.sharing is not None and self.sharing.reuses:
            return query_norm, None
        return None if key_norm is None else (query_norm, key_norm)

    @property
    def value_norm(self) -> Callable | None:
        return self.base_attention.get_submodule(self.layout.value_norm) if self.layout.value_norm else None

    @functools.cached_property
    def sharing(self) -> "KeyValueSharing | None":
        return self.layout.key_value_sharing(self.base_attention)

    def attend(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor:
        kwargs, config = self.attention_kwargs, self.stream.config
        # transformers' attention functions and caches take (batch, heads, positions, head_dim).
        query = self._scaled_query(query.transpose(1, 2))
        if self.sharing is not None and self.sharing.reuses:
            # As the base layer reads `shared_kv_states` rather than its cache: a sliding cache keeps only its
            # window, while the storing layer's keys and values cover every position this forward attends to.
            key, value = self.stream.shared_key_values[self.sharing.group]
        else:
            key, value = self._cached(key.transpose(1, 2), value.transpose(1, 2))
        sinks = self.layout.attention_sinks
        if sinks is not None:
            kwargs = {**kwargs, "s_aux": getattr(self.heads, sinks)}
        heads, _ = self.stream.attention_fn(
            self.heads,
            query,
            key,
            value,
            kwargs.get("attention_mask"),
            dropout=config.attention_dropout if self.heads.training else 0.0,
            # The inserted heads attend like the original ones: same scale, same window.
            scaling=self.base_attention.scaling,
            sliding_window=self.layout.sliding_window(self.base_attention),
            **{name: value for name, value in kwargs.items() if name not in _OWN_ATTENTION_ARGUMENTS},
        )
        return heads.reshape(*heads.shape[:-2], -1)

    def _cache(self):
        """The cache this forward fills, with its inserted layers added where it lacks them; None without one."""
        kwargs = self.attention_kwargs
        cache = next((kwargs[name] for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None), None)
        if cache is not None:
            ensure_inserted_cache_layers(cache, self.stream.config, len(self.stream.inserted_cache_indices))
        return cache

    def _scaled_query(self, query: torch.Tensor) -> torch.Tensor:
        """`query` (batch, heads, positions, head_dim) times the layout's factor by position, where it has one."""
        if self.layout.query_scale is None:
            return query
        cache = self._cache()
        past_length = 0 if cache is None else cache.get_seq_length(self.cache_index)
        # The positions as the base counts them: after what its cache layer (like this inserted one) holds.
        positions = torch.arange(query.shape[-2], device=query.device) + past_length
        scale = self.layout.query_scale(self.base_attention, positions)
        return query if scale is None else (query * scale[:, None]).to(query.dtype)

    def _cached(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values the heads attend over: with the cached ones before them where there is a cache, and
        kept for the later layers that reuse them where the base layer keeps its own."""
        cache = self._cache()
        if cache is not None:
            key, value = cache.update(key, value, self.cache_index)
        if self.sharing is not None and self.sharing.stores:
            self.stream.shared_key_values[self.sharing.group] = key, value
        return key, value


def raw_input_key(module: str) -> str:
    """Where the raw input of a module without a norm before it is captured."""
    return f"{module} (input)"


def latent_key(module: str) -> str:
    """Where the output of a latent the inserted heads read is captured."""
    return f"{module} (output)"


class CapturePointMissed(RuntimeError):
    """A base module the inserted stream reads was not called as the architecture's layout says."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"Otter reads the base model at `{path}`, but that module was not called during this forward "
            f"(transformers {transformers.__version__}): this transformers version computes the layer differently "
            "from what otter_hf was written for, so the inserted stream cannot follow it. Nothing was returned "
            "rather than a wrong value; install a transformers version otter_hf supports (see its README)."
        )


class InsertedStream:
    """The inserted stream `g` through one forward of the base model, and what the running layer has captured."""

    def __init__(
        self,
        config,
        compute_grad: bool,
        record_hidden_states: bool,
        norm_eps: float,
        attention_fn: Callable,
        inserted_cache_indices: dict[int, int],
    ):
        self.config = config
        # Decoder layer index -> the cache layer of its inserted keys and values (`inserted_cache_layer_indices`).
        self.inserted_cache_indices = inserted_cache_indices
        # Whether the inserted computation builds a graph (the base runs without one while training).
        self.compute_grad = compute_grad
        # Read once per forward rather than at every capture: the norms' eps, the attention implementation.
        self._norm_eps = norm_eps
        self._norm_eps_tensors: dict[torch.device, torch.Tensor] = {}
        self.attention_fn = attention_fn
        # id(cos) -> (cos, the rotation's tables): computed once for all layers that receive the same embeddings.
        self._rotary_tables: dict[int, tuple[torch.Tensor, tuple]] = {}
        self.hidden: torch.Tensor | None = None
        # The token embedding's output in this forward (and its version counter, to see changes in place) and the
        # inserted stream's embedding of the same ids, until the decoder receives its input embeddings (which a
        # vision-language model builds from them).
        self.token_embedding: tuple[torch.Tensor, int | None, torch.Tensor] | None = None
        # The inserted keys and values that layers storing them hand the later layers reusing them, by group.
        self.shared_key_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Capture point path -> what its hook recorded, for the decoder layer running now: a `NormCapture` for a
        # norm, the (module, keyword arguments) of the attention call, the input tensor of an output projection.
        self.captured: dict[str, NormCapture | tuple[nn.Module, dict] | torch.Tensor] = {}
        self.layers_run = 0
        # The inserted stream entering each decoder layer, then after the final norm (as transformers records the
        # original stream's hidden states), when asked for.
        self.hidden_states: list[torch.Tensor] | None = [] if record_hidden_states else None
        # After the final norm: both streams, every position.
        self.final_original: torch.Tensor | None = None
        self.final_inserted: torch.Tensor | None = None

    @functools.cached_property
    def base_cache_layers(self) -> int:
        return base_cache_layers(self.config)

    def norm_eps(self, device: torch.device) -> torch.Tensor:
        """The norms' eps as a float32 scalar tensor on `device`, which the statistics add in one operation."""
        eps = self._norm_eps_tensors.get(device)
        if eps is None:
            eps = self._norm_eps_tensors[device] = torch.tensor(self._norm_eps, dtype=torch.float32, device=device)
        return eps

    def rotary_tables(self, rotary, attention_kwargs: dict):
        """The rotation's tables for the rotary embeddings a base attention module received: `(cos, sin)`, or one
        tensor of complex factors (Llama 4, DeepSeek-V2)."""
        embeddings = attention_kwargs["position_embeddings"]
        embeddings = (embeddings,) if isinstance(embeddings, torch.Tensor) else tuple(embeddings)
        cached = self._rotary_tables.get(id(embeddings[0]))
        if cached is None or cached[0] is not embeddings[0]:
            cached = self._rotary_tables[id(embeddings[0])] = (embeddings[0], rotary.tables(*embeddings))
        return cached[1]

    def grad_mode(self):
        """Where the inserted stream is computed inside the base's forward: with autograd when it trains."""
        return torch.enable_grad() if self.compute_grad else contextlib.nullcontext()

    def add_embedding(self, embedding: torch.Tensor) -> None:
        self.hidden = embedding if self.hidden is None else self.hidden + embedding

    def take(self, path: str, layer_path: str):
        if path not in self.captured:
            raise CapturePointMissed(f"{layer_path}.{path}")
        return self.captured.pop(path)

    def layer_capture(
        self, layout: "OtterLayout", layer: nn.Module, layer_path: str, index: int, units_path: str | None = None
    ) -> LayerCapture:
        """What the decoder layer that just ran handed the capture points, as the inserted layer reads it; the
        original units come from `units_path` (its `MlpReadout`), the layout's `mlp_output` unless given. A
        linear-attention layer hands over its linear attention's output and its MLP's capture points."""

        def output_norm(path: str | None) -> NormCapture | None:
            return self.take(path, layer_path) if path is not None else None

        def input_norm(path: str | None, module: str) -> NormCapture | RawInput:
            return self.take(path, layer_path) if path is not None else self.take(raw_input_key(module), layer_path)

        per_layer = layout.per_layer_input_of(layer)
        attention_norm = heads = original_heads = attention_output_norm = linear_output = None
        attention_latents = ()
        if isinstance(layer.inserted_attn, OtterLinearAttentionReadout):
            linear_output = self.take(layout.linear_attention, layer_path)
        else:
            attention, attention_kwargs = self.take(layout.attention, layer_path)
            projection_norms = layout.query_key_projection_norms
            if projection_norms is not None:
                projection_norms = tuple(
                    self.take(f"{layout.attention}.{path}", layer_path) for path in projection_norms
                )
            attention_norm = input_norm(layout.attention_norm, layout.attention)
            heads = TransformersHeadsAttention(
                layer.inserted_attn,
                attention,
                attention_kwargs,
                self.inserted_cache_indices.get(index),
                self,
                layout,
                projection_norms,
            )
            original_heads = self.take(layout.attention_output, layer_path)
            attention_output_norm = output_norm(layout.attention_output_norm)
            attention_latents = tuple(
                self.take(latent_key(path), layer_path) for path in layout.attention_latents(layer)
            )
        return LayerCapture(
            attention_norm=attention_norm,
            attention=heads,
            original_heads=original_heads,
            mlp_norm=input_norm(layout.mlp_norm, layout.mlp),
            original_units=self.take(units_path or layout.mlp_output, layer_path),
            attention_latents=attention_latents,
            attention_output_norm=attention_output_norm,
            mlp_output_norm=output_norm(layout.mlp_output_norm),
            residual_multiplier=getattr(self.config, layout.residual_multiplier)
            if layout.residual_multiplier
            else None,
            linear_output=linear_output,
            per_layer_units=self.take(per_layer.projection, layer_path) if per_layer is not None else None,
            per_layer_output_norm=output_norm(per_layer.output_norm if per_layer is not None else None),
            output_scale=getattr(layer, layout.output_scale) if layout.output_scale is not None else None,
        )
