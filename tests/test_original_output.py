"""The original output is sacred: Otter logits are bit-identical to the base model's in fp32."""

import pytest
import torch
from transformers import DynamicCache

from otter_hf.modeling.inserted_stream import otter_cache_layers
from tests.helpers import make_base, make_otter, random_batch


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("batch_size,length", [(1, 1), (1, 9), (3, 12)])
@pytest.mark.parametrize("logits_to_keep", [0, 1])
def test_prefill_logits_are_bit_identical(base_name, padding, batch_size, length, logits_to_keep):
    base = make_base(base_name)
    otter = make_otter(base, token_reward_head=True)
    input_ids, attention_mask = random_batch(batch_size, length, padding)
    with torch.no_grad():
        expected = base(input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep).logits
        output = otter(
            input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, output_token_reward_logits=True
        )
    assert torch.equal(output.logits, expected)
    assert output.token_reward_logits.shape == expected.shape
    # Gemma 4 with layers reusing earlier layers' keys and values (transformers >= 5.25) runs those layers on the
    # kept positions only: the original stream, and so the value, ends there.
    positions = length if not logits_to_keep or output.value.shape[1] == length else logits_to_keep
    assert positions == length or base.config.num_kv_shared_layers > 0
    assert output.value.shape == (batch_size, positions)
    assert output.value.dtype == torch.float32
    assert torch.isfinite(output.value).all()


def test_hidden_states_are_the_base_hidden_states(base_name):
    base = make_base(base_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 10, "left")
    with torch.no_grad():
        expected = base(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        output = otter(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert len(output.hidden_states) == len(expected)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(output.hidden_states, expected))
    assert output.inserted_hidden_states[-1].shape == (2, 10, otter.config.inserted_hidden_size)


def _decode_step_by_step(model, input_ids, attention_mask, prompt_length):
    """Prefill `prompt_length` tokens, then feed the rest one at a time through the cache."""
    cache = DynamicCache(config=model.config)
    outputs = [
        model(
            input_ids[:, :prompt_length],
            attention_mask=attention_mask[:, :prompt_length],
            past_key_values=cache,
            use_cache=True,
        )
    ]
    for position in range(prompt_length, input_ids.shape[1]):
        outputs.append(
            model(
                input_ids[:, position : position + 1],
                attention_mask=attention_mask[:, : position + 1],
                past_key_values=cache,
                use_cache=True,
            )
        )
    return outputs, cache


@pytest.mark.parametrize("padding", [None, "left"])
def test_cached_decoding_logits_are_bit_identical(base_name, padding):
    base = make_base(base_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 11, padding)
    with torch.no_grad():
        expected, _ = _decode_step_by_step(base, input_ids, attention_mask, prompt_length=4)
        outputs, cache = _decode_step_by_step(otter, input_ids, attention_mask, prompt_length=4)
        full = otter(input_ids, attention_mask=attention_mask)
    for ours, theirs in zip(outputs, expected):
        assert torch.equal(ours.logits, theirs.logits)
    # The inserted stream reads its own cached keys and values: stepping through the cache gives the same
    # values as one pass over the whole sequence.
    stepped_values = torch.cat([output.value for output in outputs], dim=1)
    real = attention_mask.bool()
    # float32 rounding of sums as large as the largest value (Gemma's scaled stream reaches thousands).
    scale = full.value[real].abs().max().item()
    torch.testing.assert_close(stepped_values[real], full.value[real], atol=1e-5 * max(scale, 1.0), rtol=1e-4)
    assert len(cache.layers) == otter_cache_layers(otter.config)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_generate_is_token_identical(base_name, batch_size):
    base = make_base(base_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(batch_size, 6, "left" if batch_size > 1 else None)
    settings = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    expected = base.generate(input_ids, **settings)
    generated = otter.generate(input_ids, **settings)
    assert torch.equal(generated, expected)


def test_greedy_generate_is_token_identical_in_bfloat16(base_name):
    base = make_base(base_name).to(torch.bfloat16)
    otter = make_otter(base)
    assert otter.get_input_embeddings().weight.dtype == torch.bfloat16
    assert otter.v_head.summary.weight.dtype == torch.float32
    input_ids, attention_mask = random_batch(3, 7, "left")
    settings = dict(attention_mask=attention_mask, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(otter.generate(input_ids, **settings), base.generate(input_ids, **settings))
    with torch.no_grad():
        assert otter(input_ids, attention_mask=attention_mask).value.dtype == torch.float32


def test_training_the_inserted_parameters_never_moves_the_logits(base_name):
    base = make_base(base_name)
    otter = make_otter(base, token_reward_head=True)
    input_ids, attention_mask = random_batch(2, 8, "right")
    with torch.no_grad():
        expected = base(input_ids, attention_mask=attention_mask).logits
        value_before = otter(input_ids, attention_mask=attention_mask).value
    # Adam: steps of bounded size, so the value and the reward logits stay finite on every architecture.
    optimizer = torch.optim.Adam(otter.otter_parameters(), lr=1e-2)
    otter.train()
    for _ in range(3):
        output = otter(input_ids, attention_mask=attention_mask, output_token_reward_logits=True)
        loss = output.value.pow(2).mean() - output.token_reward_logits.log_softmax(-1)[..., 0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    otter.eval()
    with torch.no_grad():
        output = otter(input_ids, attention_mask=attention_mask)
    assert torch.equal(output.logits, expected)
    assert torch.isfinite(output.value).all() and not torch.allclose(output.value, value_before)
    assert 0 < otter.token_reward_head.proj.weight.abs().sum() < float("inf")
