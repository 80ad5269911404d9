"""The original output is the base model's own computation: bit-identical in every dtype and attention
implementation, on every architecture, with norm weights that are not the identity."""

import pytest
import torch
from transformers import DynamicCache

from otter_hf.modeling.inserted_stream import otter_cache_layers
from tests.helpers import BASE_MODELS, make_base, make_otter, random_batch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_half_precision_base(name: str, dtype: torch.dtype, attn_implementation: str):
    base = make_base(name, attn_implementation=attn_implementation)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        # Norm weights and biases away from their initial identity, so every norm's weight takes part.
        for parameter_name, parameter in base.named_parameters():
            if "norm" in parameter_name or ".ln_" in parameter_name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return base.to(dtype)


@pytest.fixture(params=sorted(BASE_MODELS))
def matrix_name(request):
    return request.param


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_original_output_is_bit_identical(matrix_name, dtype_name, attn_implementation):
    model_class = BASE_MODELS[matrix_name][1]
    if attn_implementation == "sdpa" and not model_class._supports_sdpa:
        pytest.skip(f"transformers runs {model_class.__name__} without sdpa (gpt-oss: sdpa has no attention sinks)")
    base = make_half_precision_base(matrix_name, DTYPES[dtype_name], attn_implementation)
    otter = make_otter(base, noise=0.01, token_reward_head=True)
    # float16's range is float32's / 2^112: random inserted weights overflow it at Gemma's padded positions, and an
    # infinite key there turns the real positions' inserted attention to NaN. The original stream never reads it.
    inserted_outputs_are_finite = DTYPES[dtype_name] != torch.float16
    assert otter.config._attn_implementation == attn_implementation
    input_ids, attention_mask = random_batch(3, 9, "left")
    with torch.no_grad():
        expected = base(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        output = otter(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        assert torch.equal(output.logits, expected.logits)
        assert len(output.hidden_states) == len(expected.hidden_states) == len(output.inserted_hidden_states)
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(output.hidden_states, expected.hidden_states))
        if inserted_outputs_are_finite:
            assert torch.isfinite(output.value).all()

        # A prefill then decode steps through the cache, the inserted keys and values cached beside the base's.
        base_cache, otter_cache = DynamicCache(config=base.config), DynamicCache(config=otter.config)
        for start, end in ((0, 6), (6, 7), (7, 8)):
            step = dict(attention_mask=attention_mask[:, :end], use_cache=True)
            expected = base(input_ids[:, start:end], past_key_values=base_cache, **step)
            output = otter(
                input_ids[:, start:end], past_key_values=otter_cache, output_token_reward_logits=True, **step
            )
            assert torch.equal(output.logits, expected.logits)
            if inserted_outputs_are_finite:
                assert torch.isfinite(output.token_reward_logits).all()
        # An inserted cache layer for each layer caching keys and values of its own: none for linear-attention layers
        # or layers reusing an earlier layer's keys and values.
        assert len(otter_cache.layers) == otter_cache_layers(otter.config)

    settings = dict(attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(otter.generate(input_ids, **settings), base.generate(input_ids, **settings))
