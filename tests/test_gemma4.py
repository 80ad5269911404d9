"""Gemma 4's per-layer attributes, each followed by the inserted stream as layout data: per-layer head sizes,
keys and values shared across layers, per-layer inputs, the layer scalar, and routed experts beside the dense MLP.
The precision matrix and the copy-initialisation tests run on both tiny Gemma 4 configs too."""

import pytest
import torch
from transformers import DynamicCache

import otter_hf
from otter_hf.modeling.inserted_stream import raw_input_key
from tests.helpers import make_base, make_otter, random_batch

SHARED_KV = "gemma4-per-layer-shared-kv"
MOE = "gemma4-moe"


def test_inserted_heads_take_their_layers_head_size_and_key_value_sharing():
    otter = otter_hf.insert(make_base(SHARED_KV), inserted_num_attention_heads=2, inserted_num_key_value_heads=1)
    heads = [layer.inserted_attn for layer in otter.otter_decoder_layers()]
    # Sliding layers have 16-wide heads, global ones 32-wide; the inserted heads of each layer alike.
    assert [attention.head_dim for attention in heads] == [16, 32, 16, 32]
    # Layers 2 and 3 reuse the keys and values of layers 0 and 1: their inserted heads project queries only, and
    # attend over the inserted keys and values of those layers (which `test_copied_heads_attend_as_their_sources`
    # checks value for value).
    assert [attention.projects_key_value for attention in heads] == [True, True, False, False]
    joined = otter.config.hidden_size + otter.config.inserted_hidden_size
    assert [tuple(attention.qkv_proj.weight.shape) for attention in heads] == [
        ((2 + 2 * 1) * 16, joined),
        ((2 + 2 * 1) * 32, joined),
        (2 * 16, joined),
        (2 * 32, joined),
    ]


def test_values_decoded_through_the_cache_equal_the_uncached_forward():
    # Past the sliding window (4): the sliding layer reusing layer 0's keys and values reads them from what layer 0
    # hands on, not from its cache, which keeps only the window.
    otter = make_otter(make_base(SHARED_KV))
    input_ids, attention_mask = random_batch(2, 9, padding="left")
    with torch.no_grad():
        uncached = otter(input_ids, attention_mask=attention_mask)
        cache = DynamicCache(config=otter.config)
        values = [otter(input_ids[:, :5], attention_mask=attention_mask[:, :5], past_key_values=cache).value]
        for position in range(5, 9):
            step = otter(
                input_ids[:, position : position + 1],
                attention_mask=attention_mask[:, : position + 1],
                past_key_values=cache,
            )
            values.append(step.value)
    torch.testing.assert_close(torch.cat(values, dim=1), uncached.value, rtol=2e-5, atol=1e-5)


def test_positions_the_base_drops_before_its_key_value_sharing_layers_are_dropped_from_the_inserted_stream():
    # With an integer `logits_to_keep`, transformers 5.25 runs Gemma 4's KV-sharing layers on the kept positions
    # only (5.19 on all of them); the inserted stream follows, so its heads read the last positions either way.
    otter = make_otter(make_base(SHARED_KV))
    input_ids, attention_mask = random_batch(2, 9)
    with torch.no_grad():
        full = otter(input_ids, attention_mask=attention_mask)
        kept = otter(input_ids, attention_mask=attention_mask, logits_to_keep=1)
    assert kept.logits.shape[1] == 1
    torch.testing.assert_close(kept.value[:, -1], full.value[:, -1], atol=1e-5, rtol=1e-4)


def test_the_inserted_stream_is_scaled_by_the_layer_scalar_as_the_original_one():
    # Gemma 4 checkpoints carry a `layer_scalar` per layer (ones in a fresh model); the copied dimensions follow
    # the original ones only if the inserted stream is multiplied alike.
    base = make_base(SHARED_KV)
    with torch.no_grad():
        for index, layer in enumerate(base.model.layers):
            layer.layer_scalar.fill_(0.5 + 0.25 * index)
    otter = otter_hf.insert(base, inserted_hidden_size=16, inserted_num_attention_heads=2)
    input_ids, attention_mask = random_batch(2, 7)
    with torch.no_grad():
        output = otter(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    for original, inserted in zip(output.hidden_states, output.inserted_hidden_states):
        torch.testing.assert_close(inserted, original[..., :16], atol=1e-5, rtol=1e-4)


def test_per_layer_inputs_reach_the_inserted_stream_through_the_base_units():
    # No inserted per-layer embedding: the base's per-layer table is untouched, and each layer's inserted
    # projection reads the base's gated per-layer units (starting as the first rows of the base's projection).
    otter = otter_hf.insert(make_base(SHARED_KV), inserted_hidden_size=16)
    assert not any("embed_tokens_per_layer" in name for name, _ in otter.otter_named_parameters())
    for layer in otter.otter_decoder_layers():
        projection = layer.inserted_per_layer_input.proj
        assert torch.equal(projection.weight, layer.per_layer_projection.weight[:16])
    assert not hasattr(make_otter(make_base(MOE)).model.layers[0], "inserted_per_layer_input")


@pytest.mark.parametrize("name", [SHARED_KV, MOE])
def test_gradients_reach_every_inserted_parameter_and_no_base_one(name):
    otter = make_otter(make_base(name))
    otter.train()
    input_ids, attention_mask = random_batch(2, 6)
    otter(input_ids, attention_mask=attention_mask).value.sum().backward()
    for parameter_name, parameter in otter.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
        else:
            assert parameter.grad is None, parameter_name


def test_router_logits_are_the_base_ones():
    base = make_base(MOE)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(3, 8, "left")
    with torch.no_grad():
        expected = base(input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
        output = otter(input_ids, attention_mask=attention_mask, output_router_logits=True)
        backbone = otter.model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    assert len(output.router_logits) == len(expected.router_logits) == base.config.num_hidden_layers
    for routers in (output.router_logits, backbone.router_logits):
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(routers, expected.router_logits))
    assert output.value.shape == input_ids.shape


def test_sparse_layers_read_the_sum_of_the_experts_and_the_dense_mlp():
    otter = otter_hf.insert(make_base(MOE), inserted_hidden_size=16, inserted_intermediate_size=24)
    config, layout = otter.config, otter.model.otter_layout
    for layer in otter.otter_decoder_layers():
        readout = layout.mlp_readout(layer, config)
        # The input of `post_feedforward_layernorm`, which is a norm capture point too: kept under its own key.
        assert (readout.units_path, readout.reads_output, readout.units_width) == (
            "post_feedforward_layernorm",
            False,
            config.hidden_size,
        )
        assert readout.key == raw_input_key("post_feedforward_layernorm")
        down = layer.inserted_mlp.down_proj.weight
        assert torch.equal(down[:, : config.hidden_size], torch.eye(config.hidden_size)[:16])
        # Gate and up copy the dense MLP's first units: the always-on part of the layer, as a shared expert.
        gate, up = layer.inserted_mlp.gate_up_proj.weight[:, : config.hidden_size].chunk(2)
        assert torch.equal(gate, layer.mlp.gate_proj.weight[:24]) and torch.equal(up, layer.mlp.up_proj.weight[:24])
