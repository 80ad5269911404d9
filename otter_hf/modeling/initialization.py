"""The three ways `otter_hf.insert` starts the inserted parameters: copy, normal, random."""

import functools

import torch
from torch import nn

from .inserted_heads import INSERTED_HEADS, initialize_linear
from .inserted_layer import (
    OtterInsertedAttention,
    OtterInsertedMLP,
    OtterInsertedPerLayerInput,
    OtterLinearAttentionReadout,
)
from .inserted_stream import AttentionShape, MlpReadout
from .quantization import dequantized, owner_of


@torch.no_grad()
def initialize_inserted_parameters(model, method: str) -> None:
    std = model.config.initializer_range
    layout = model.otter_backbone.otter_layout
    # Copied with the heads they normalise, below.
    projection_norms = {
        norm for layer in model.otter_decoder_layers() for norm in _query_key_projection_norms(layer, layout)
    }
    for module in model.modules():
        inserted_weight = getattr(module, "inserted_weight", None)
        if inserted_weight is None or (method == "copy" and module in projection_norms):
            continue
        size = inserted_weight.shape[-1]
        if isinstance(module, nn.Embedding):  # token or position embedding: its inserted columns
            if method == "copy":
                inserted_weight.copy_(dequantized(module.weight, module)[:, :size])
            else:
                # nn.Embedding's own default is N(0, 1).
                nn.init.normal_(inserted_weight, std=std if method == "normal" else 1.0)
            continue
        inserted_bias = getattr(module, "inserted_bias", None)  # a norm: its inserted weight (and bias)
        if method == "copy":
            inserted_weight.copy_(module.weight[:size])
            if inserted_bias is not None:
                inserted_bias.copy_(module.bias[:size])
        else:
            nn.init.constant_(inserted_weight, layout.norm.neutral_weight)
            if inserted_bias is not None:
                nn.init.zeros_(inserted_bias)
    for module in model.modules():
        if isinstance(
            module,
            (OtterInsertedAttention, OtterInsertedMLP, OtterInsertedPerLayerInput, OtterLinearAttentionReadout),
        ):
            for linear in module.modules():
                if isinstance(linear, nn.Linear):
                    initialize_linear(linear, method, std)
        if isinstance(module, OtterInsertedAttention) and layout.attention_sinks is not None:
            # N(0, std) as the base family starts its own sinks (PyTorch has no default for them); copied below.
            nn.init.normal_(getattr(module, layout.attention_sinks), std=std)
    for head in INSERTED_HEADS:
        if getattr(model, head.attribute) is not None:
            getattr(model, head.attribute).initialize(method, model.config)
    if method == "copy":
        for index, layer in enumerate(model.otter_decoder_layers()):
            copy_source = functools.cache(functools.partial(_float_copy_source, layout, layer))
            if isinstance(layer.inserted_attn, OtterLinearAttentionReadout):
                # The identity on the first dimensions of the linear attention's output, as the copied heads pass on
                # the first dimensions of what the original attention adds.
                readout = layer.inserted_attn.o_proj.weight
                readout.copy_(torch.eye(*readout.shape, dtype=readout.dtype, device=readout.device))
            else:
                shape = layout.attention_shape(model.config, index)
                _copy_attention(layer.inserted_attn, copy_source, model.config, shape.num_key_value_heads)
                if layout.attention_sinks is not None:
                    _copy_sinks(layer, layout, model.config)
                _copy_projection_norms(_query_key_projection_norms(layer, layout), model.config, shape)
            _copy_mlp(layer.inserted_mlp, copy_source, model.config, layout.mlp_readout(layer, model.config))
            per_layer = layout.per_layer_input_of(layer)
            if per_layer is not None:
                # The inserted stream's per-layer update starts as the first dimensions of the base's.
                projection = layer.get_submodule(per_layer.projection)
                inserted = layer.inserted_per_layer_input.proj
                inserted.weight.copy_(dequantized(projection.weight, projection)[: inserted.out_features])


def _float_copy_source(layout, layer, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The architecture's `copy_source` of `role`, its weight dequantized where the base is quantized."""
    weight, bias = layout.copy_source(layer, role)
    return dequantized(weight, owner_of(weight, layer)), bias


def copied_head_sources(config, num_key_value_heads: int | None = None) -> tuple[list[int], list[int]]:
    """The original query and key/value heads that each inserted head copies, in a layer whose base heads share
    `num_key_value_heads` key/value heads (the config's unless given: Gemma 4's global layers have fewer).

    Inserted key/value head j copies original key/value head j (cyclically); the inserted query heads of its
    group copy original query heads of that same group, so a copied head attends exactly as its source does.
    """
    num_key_value_heads = num_key_value_heads or config.num_key_value_heads
    original_group = config.num_attention_heads // num_key_value_heads
    inserted_group = config.inserted_num_attention_heads // config.inserted_num_key_value_heads
    kv_sources = [head % num_key_value_heads for head in range(config.inserted_num_key_value_heads)]
    query_sources = [
        kv_sources[head // inserted_group] * original_group + (head % inserted_group) % original_group
        for head in range(config.inserted_num_attention_heads)
    ]
    return query_sources, kv_sources


def _copy_rows(target: nn.Linear, target_row: int, source: tuple, source_row: int, rows: int) -> None:
    """Copy `rows` output rows of the `(weight, bias)` pair `source` into the original-stream columns of `target`."""
    weight, bias = source
    columns = weight.shape[1]
    target.weight[target_row : target_row + rows, :columns] = weight[source_row : source_row + rows]
    if target.bias is not None:
        target.bias[target_row : target_row + rows] = bias[source_row : source_row + rows]


def _copy_attention(inserted: OtterInsertedAttention, copy_source, config, num_key_value_heads: int) -> None:
    """Copied heads read the original stream like their sources; the inserted-stream blocks start at zero, so
    at first the inserted stream follows the copied dimensions of the original one. Heads that reuse an earlier
    layer's keys and values project queries only."""
    query_sources, kv_sources = copied_head_sources(config, num_key_value_heads)
    inserted.qkv_proj.weight.zero_()
    inserted.o_proj.weight.zero_()
    roles = (("query", query_sources), ("key", kv_sources), ("value", kv_sources))
    row = 0
    if not inserted.projects_key_value:
        roles = roles[:1]
    if inserted.output_gate:  # each copied head gates its output with its source head's gate
        roles = (*roles, ("query_gate", query_sources))
    for role, sources in roles:
        # Values and the gates over the heads' outputs are `value_head_dim` wide (narrower in DeepSeek's latent
        # attention).
        head_dim = inserted.head_dim if role in ("query", "key") else inserted.value_head_dim
        source_weights = copy_source(role)
        for source in sources:
            _copy_rows(inserted.qkv_proj, row, source_weights, source * head_dim, head_dim)
            row += head_dim
    _copy_rows(inserted.o_proj, 0, copy_source("output"), 0, config.inserted_hidden_size)


def _copy_mlp(inserted: OtterInsertedMLP, copy_source, config, readout: MlpReadout) -> None:
    """Copied units read the original stream like the first original units; the down projection passes on the
    first `inserted_hidden_size` dimensions of what the original MLP adds to its stream.

    In a dense layer that is the original down projection's first rows over the original units. In a sparse
    layer the inserted down projection reads the sparse block's output, so its original-stream block is the
    identity on those dimensions, and the units copy the architecture's `copy_source` for gate and up (a shared
    expert's first units where the family has one, else expert 0's).
    """
    units = config.inserted_intermediate_size
    if inserted.gated:  # gate units, then up units
        input_proj, roles = inserted.gate_up_proj, ("gate", "up")
    else:
        input_proj, roles = inserted.up_proj, ("up",)
    input_proj.weight.zero_()
    inserted.down_proj.weight.zero_()
    for index, role in enumerate(roles):
        source = copy_source(role)
        if source[0].shape[0] < units:
            raise ValueError(
                f"inserted_init='copy' copies {units} FFN units, but the original {role} projection it copies from "
                f"(`copy_source` of this architecture) has {source[0].shape[0]}; choose `inserted_intermediate_size` "
                f"<= {source[0].shape[0]} or inserted_init='normal'."
            )
        _copy_rows(input_proj, index * units, source, 0, units)
    if readout.stream_space:
        weight = inserted.down_proj.weight
        identity = torch.eye(readout.units_width, dtype=weight.dtype, device=weight.device)
        down = identity, (None if inserted.down_proj.bias is None else identity.new_zeros(readout.units_width))
    else:
        down = copy_source("down")
    _copy_rows(inserted.down_proj, 0, down, 0, config.inserted_hidden_size)


def _copy_sinks(layer: nn.Module, layout, config) -> None:
    """Each inserted query head takes the sink logit of the original head it copies, so that it attends as its
    source does (gpt-oss)."""
    query_sources, _ = copied_head_sources(config)
    original = layer.get_parameter(f"{layout.attention}.{layout.attention_sinks}")
    getattr(layer.inserted_attn, layout.attention_sinks).copy_(original[query_sources])


def _query_key_projection_norms(layer: nn.Module, layout) -> tuple[nn.Module, ...]:
    if layout.query_key_projection_norms is None or not layout.has_inserted_heads(layer):
        return ()
    return tuple(layer.get_submodule(f"{layout.attention}.{path}") for path in layout.query_key_projection_norms)


def _copy_projection_norms(norms: tuple[nn.Module, ...], config, shape: AttentionShape) -> None:
    """A projection-wide query or key norm's inserted weight: the slices of its heads' sources, so that a copied
    head is normalised as its source is."""
    head_dim = shape.head_dim
    for norm, sources in zip(norms, copied_head_sources(config, shape.num_key_value_heads)):
        norm.inserted_weight.copy_(
            torch.cat([norm.weight[source * head_dim : (source + 1) * head_dim] for source in sources])
        )
