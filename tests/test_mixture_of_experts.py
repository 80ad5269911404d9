"""Mixture-of-experts bases: the router and its auxiliary loss stay the base's; the inserted down projection of a
sparse layer reads the sparse block's output, of a dense layer the original units; copy-initialisation copies
from a real expert."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import otter_hf
from otter_hf.modeling import OTTER_CLASSES_BY_BASE_MODEL_TYPE, is_inserted_parameter
from tests.helpers import BASE_MODELS, make_base, make_otter, random_batch

# The tiny bases whose routers transformers can report (`output_router_logits`).
MIXTURE_OF_EXPERTS_BASES = sorted(
    name for name, (config_class, _, _) in BASE_MODELS.items() if hasattr(config_class, "output_router_logits")
)


@pytest.fixture(params=MIXTURE_OF_EXPERTS_BASES)
def moe_name(request):
    return request.param


def test_router_logits_and_auxiliary_loss_are_the_base_ones(moe_name):
    base = make_base(moe_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(3, 8, "left")
    inputs = dict(attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
    with torch.no_grad():
        expected = base(input_ids, **inputs)
        output = otter(input_ids, **inputs)
    assert len(output.router_logits) == len(expected.router_logits) > 0
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(output.router_logits, expected.router_logits))
    if expected.aux_loss is None:  # GLM-4-MoE's, DeepSeek's and Llama 4's causal LMs compute none
        assert output.aux_loss is None
    else:
        assert torch.equal(output.aux_loss, expected.aux_loss)
    assert torch.equal(output.loss, expected.loss)  # the language-model loss plus the weighted auxiliary loss
    assert output.value.shape == input_ids.shape
    # As a tuple: the base's fields first, in its order (loss, aux_loss, logits, cache, router_logits).
    with torch.no_grad():
        expected_tuple = base(input_ids, **inputs, return_dict=False)
        as_tuple = otter(input_ids, **inputs, return_dict=False)
    assert len(as_tuple) > len(expected_tuple)
    for ours, theirs in zip(as_tuple, expected_tuple):
        if isinstance(theirs, torch.Tensor):
            assert torch.equal(ours, theirs)
        elif isinstance(theirs, tuple):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        else:  # the cache
            assert type(ours) is type(theirs)
    # The backbone on its own passes the router logits on too.
    with torch.no_grad():
        backbone_output = otter.model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(backbone_output.router_logits, expected.router_logits))
    assert backbone_output.inserted_last_hidden_state is not None


def test_sparse_layers_read_the_block_output_and_dense_layers_the_units(moe_name):
    otter = otter_hf.insert(make_base(moe_name))
    config, layout = otter.config, otter.model.otter_layout
    kinds = set()
    for layer in otter.otter_decoder_layers():
        readout = layout.mlp_readout(layer, config)
        sparse = isinstance(layer.get_submodule(layout.sparse_mlp.path), layout.sparse_mlp.block_class)
        kinds.add(sparse)
        assert readout.reads_output == sparse
        expected_width = config.hidden_size if sparse else getattr(config, layout.dense_units)
        down = layer.inserted_mlp.down_proj
        assert down.in_features == expected_width + config.inserted_intermediate_size
        # Copy-initialisation: the identity on the first inserted dimensions of the block output; the original
        # down projection's first rows over the original units.
        original_block = down.weight[:, :expected_width]
        expected_block = (
            torch.eye(config.hidden_size)[: config.inserted_hidden_size]
            if sparse
            else layout.copy_source(layer, "down")[0][: config.inserted_hidden_size]
        )
        assert torch.equal(original_block, expected_block)
    assert True in kinds


def test_gradients_reach_only_inserted_parameters_past_the_experts(moe_name):
    otter = make_otter(make_base(moe_name))
    otter.train()
    input_ids, attention_mask = random_batch(2, 6)
    otter(input_ids, attention_mask=attention_mask).value.sum().backward()
    for name, parameter in otter.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_copy_init_refuses_more_units_than_the_expert_it_copies_has(moe_name):
    base = make_base(moe_name)
    sparse = OTTER_CLASSES_BY_BASE_MODEL_TYPE[base.config.model_type].backbone_class.otter_layout.sparse_mlp
    block = next(
        layer.get_submodule(sparse.path)
        for layer in base.model.layers
        if isinstance(layer.get_submodule(sparse.path), sparse.block_class)
    )
    # Gate and up copy the shared expert where there is one (DeepSeek's and GLM-4-MoE's `shared_experts`), else
    # expert 0.
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    experts = block.experts
    expert_units = getattr(experts, "intermediate_dim", None) or experts.intermediate_size  # gpt-oss's name
    units = shared.gate_proj.out_features if shared is not None else expert_units
    with pytest.raises(ValueError, match=f"copies {units + 1} .*{units}"):
        otter_hf.insert(base, inserted_hidden_size=16, inserted_intermediate_size=units + 1)


def test_a_checkpoint_stores_the_experts_as_the_base_checkpoint_and_reloads_exactly(moe_name, tmp_path):
    base = make_base(moe_name)
    base.save_pretrained(tmp_path / "base")
    make_otter(base).save_pretrained(tmp_path / "otter")

    def stored_base_weights(folder):
        # Per expert where the base checkpoint is (Mixtral's `w1`, `w2`, `w3`), under the base's names for the
        # experts (Granite-MoE's fused `input_linear`); the sparse block's own name aside.
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            names = weights.keys()
            stored = {name: weights.get_slice(name).get_shape() for name in names}
        shapes = sorted(shape for name, shape in stored.items() if not is_inserted_parameter(name))
        return shapes, {name.split(".experts.")[1] for name in stored if ".experts." in name}

    assert stored_base_weights(tmp_path / "otter") == stored_base_weights(tmp_path / "base")
    reloaded_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "otter")
    assert reloaded.config._experts_implementation == reloaded_base.config._experts_implementation
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        assert torch.equal(
            reloaded(input_ids, attention_mask=attention_mask).logits,
            reloaded_base(input_ids, attention_mask=attention_mask).logits,
        )


def copied_units_and_normed_inputs(otter, units: int):
    """Per decoder layer, the inserted units and the sparse block's normalised input of one forward of a
    copy-initialised model with `units` inserted units."""
    captured = []
    for layer in otter.otter_decoder_layers():
        record = {}
        captured.append(record)
        layer.post_attention_layernorm.register_forward_hook(
            lambda module, args, output, record=record: record.update(normed=output)
        )
        layer.inserted_mlp.down_proj.register_forward_pre_hook(
            lambda module, args, record=record: record.update(units=args[1])
        )
    input_ids, attention_mask = random_batch(2, 7)
    with torch.no_grad():
        otter(input_ids, attention_mask=attention_mask)
    assert all(record["units"].shape[-1] == units for record in captured)
    return captured


def test_gpt_oss_copied_units_take_the_experts_clamped_swiglu_with_their_biases():
    # gpt-oss stores expert 0's gate and up values interleaved in `gate_up_proj [E, H, 2I]`, with biases, and
    # clamps them in its SwiGLU (the tiny config's limit bites); a copied unit computes expert 0's unit.
    base = make_base("gptoss-sinks-sliding")
    otter = otter_hf.insert(base, inserted_hidden_size=16, inserted_intermediate_size=8)
    for layer, record in zip(otter.otter_decoder_layers(), copied_units_and_normed_inputs(otter, 8)):
        experts = layer.mlp.experts
        gate_up = record["normed"] @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
        assert (gate_up.abs() > experts.limit).any()
        torch.testing.assert_close(record["units"], experts._apply_gate(gate_up)[..., :8])


def test_glm4_moe_copies_the_shared_experts_in_sparse_layers_and_the_mlp_in_dense_ones():
    base = make_base("glm4moe-dense-shared")
    otter = otter_hf.insert(base, inserted_hidden_size=16, inserted_intermediate_size=8)
    dense, sparse = otter.otter_decoder_layers()  # `first_k_dense_replace=1`
    assert type(dense.mlp).__name__ == "Glm4MoeMLP" and type(sparse.mlp).__name__ == "Glm4MoeMoE"
    for layer, record in zip((dense, sparse), copied_units_and_normed_inputs(otter, 8)):
        source = layer.mlp.shared_experts if layer is sparse else layer.mlp
        normed = record["normed"]
        expected = source.act_fn(source.gate_proj(normed)) * source.up_proj(normed)
        torch.testing.assert_close(record["units"], expected[..., :8])


def test_olmoe_refuses_a_config_that_clamps_queries_keys_and_values():
    with pytest.raises(ValueError, match=r"olmoe.*clip_qkv=8\.0.*self_attn"):
        otter_hf.insert(make_base("olmoe-sparse-qk-norm", clip_qkv=8.0))
