"""Reward-guided decoding: the logits processor, the one-forward-per-token loop, and guidance switched off."""

import pytest
import torch
from transformers import LogitsProcessorList

from otter_hf.generation import OtterRewardLogitsProcessor, reward_guided_generate
from otter_hf.modeling.inserted_stream import otter_cache_layers
from otter_hf.modeling.loop_inputs import padding_position_ids
from tests.helpers import BASE_MODELS, EOS, PAD, make_base, make_otter, random_batch

# Sliding windows (and Llama 4's attention chunks) widened so prompt, new tokens and candidates fit in them (beyond,
# guidance refuses to run). Hybrid bases refuse to score candidates (tests/test_linear_attention.py): their recurrent
# states cannot share the prefix through a 4D mask.
GUIDED_BASES = {
    name: {window: 16 for window in ("sliding_window", "attention_chunk_size") if window in sizes}
    for name, (_, _, sizes) in BASE_MODELS.items()
    if "linear_attention" not in sizes.get("layer_types", ())
}
# Candidates scored together would each take another temperature there (see the test of its refusal).
GUIDED_BASES["llama4-nope-chunked-moe"]["attn_temperature_tuning"] = False
WEIGHT, TOP_K = 3.0, 4


def reference_values(otter, input_ids, attention_mask, candidates):
    """The value of prefix + v for every candidate v, each from a full forward without any cache."""
    values = []
    for column in range(candidates.shape[1]):
        sequence = torch.cat([input_ids, candidates[:, column : column + 1]], dim=-1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
        position_ids = padding_position_ids(mask.bool())
        values.append(otter(sequence, attention_mask=mask, position_ids=position_ids, use_cache=False).value[:, -1])
    return torch.stack(values, dim=-1)


@torch.no_grad()
def reference_guided_greedy(otter, input_ids, attention_mask, steps):
    """ARGS greedy decoding spelled out: full forwards, no cache, EOS suppressed (without autograd, as generate runs:
    the logits are edited in place)."""
    for _ in range(steps):
        position_ids = padding_position_ids(attention_mask.bool())
        outputs = otter(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        logits = outputs.logits[:, -1]
        logits[:, EOS] = float("-inf")
        candidate_scores, candidates = logits.topk(TOP_K, dim=-1)
        guided = candidate_scores + WEIGHT * reference_values(otter, input_ids, attention_mask, candidates)
        next_tokens = candidates.gather(-1, guided.argmax(-1, keepdim=True))
        input_ids = torch.cat([input_ids, next_tokens], dim=-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=-1)
    return input_ids


def guided_processor(otter, **kwargs):
    return LogitsProcessorList([OtterRewardLogitsProcessor(otter, weight=WEIGHT, top_k=TOP_K, **kwargs)])


FAST_PATH = dict(custom_generate=reward_guided_generate, reward_weight=WEIGHT, reward_top_k=TOP_K)


@pytest.mark.parametrize("base_name", sorted(GUIDED_BASES))
def test_processor_rescores_the_top_k_with_the_value_of_each_continuation(base_name):
    otter = make_otter(make_base(base_name, **GUIDED_BASES[base_name]))
    processor = OtterRewardLogitsProcessor(otter, weight=WEIGHT, top_k=TOP_K, pad_token_id=PAD)
    input_ids, attention_mask = random_batch(3, 6, "left")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Two consecutive steps: the second reuses the processor's cache of the first prefix.
        for _ in range(2):
            scores = torch.randn(3, otter.config.vocab_size, generator=generator)
            guided = processor(input_ids, scores.clone())
            candidate_scores, candidates = scores.topk(TOP_K, dim=-1)
            expected = candidate_scores + WEIGHT * reference_values(otter, input_ids, attention_mask, candidates)
            torch.testing.assert_close(guided.gather(-1, candidates), expected, atol=1e-5, rtol=1e-5)
            assert torch.isinf(guided).sum(-1).tolist() == [otter.config.vocab_size - TOP_K] * 3
            next_tokens = candidates[:, :1]
            input_ids = torch.cat([input_ids, next_tokens], dim=-1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=-1)


@pytest.mark.parametrize("base_name", sorted(GUIDED_BASES))
def test_both_paths_give_the_reference_tokens_with_left_padding(base_name):
    otter = make_otter(make_base(base_name, **GUIDED_BASES[base_name]))
    input_ids, attention_mask = random_batch(3, 6, "left")
    settings = dict(attention_mask=attention_mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    expected = reference_guided_greedy(otter, input_ids, attention_mask, steps=5)
    with_processor = otter.generate(input_ids, logits_processor=guided_processor(otter), **settings)
    one_forward_per_token = otter.generate(input_ids, **FAST_PATH, **settings)
    assert torch.equal(with_processor, expected)
    assert torch.equal(one_forward_per_token, expected)
    # The guidance changes what is generated (otherwise this test could not tell the paths from greedy search).
    assert not torch.equal(expected, otter.generate(input_ids, **settings))


def test_sampled_paths_agree_under_the_same_seed():
    otter = make_otter(make_base("llama-mha-untied"))
    input_ids, attention_mask = random_batch(4, 5, "left")
    settings = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=3)
    torch.manual_seed(7)
    with_processor = otter.generate(input_ids, logits_processor=guided_processor(otter), **settings)
    torch.manual_seed(7)
    one_forward_per_token = otter.generate(input_ids, **FAST_PATH, **settings)
    assert torch.equal(with_processor, one_forward_per_token)


def test_rows_stop_at_eos_and_are_padded_after_it():
    otter = make_otter(make_base("llama-gqa-tied"))
    input_ids, attention_mask = random_batch(3, 6, "left")
    settings = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, **FAST_PATH)
    free_run = otter.generate(input_ids, eos_token_id=None, **settings)[:, 6:]
    # Make the token that row 0 generates third the end-of-sequence token.
    stop_token = free_run[0, 2].item()
    stopped = otter.generate(input_ids, eos_token_id=stop_token, pad_token_id=PAD, **settings)[:, 6:]
    ends = []
    for row in range(3):
        hits = (free_run[row] == stop_token).nonzero()
        ends.append(hits[0].item() + 1 if len(hits) else free_run.shape[1])
        assert torch.equal(stopped[row, : ends[-1]], free_run[row, : ends[-1]])
        assert (stopped[row, ends[-1] :] == PAD).all()
    assert ends[0] <= 3
    # Generation ends when the last row stops, and never later than max_new_tokens.
    assert stopped.shape[1] == max(ends) <= 8


def test_cache_keeps_only_the_chosen_tokens_in_every_layer():
    otter = make_otter(make_base("qwen2-bias"))
    input_ids, attention_mask = random_batch(2, 5, "left")
    output = otter.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=4,
        min_new_tokens=4,
        return_dict_in_generate=True,
        **FAST_PATH,
    )
    # The candidate forward already cached the last chosen token, so the cache covers the whole sequence.
    mask = torch.cat([attention_mask, attention_mask.new_ones(2, 4)], dim=-1)
    with torch.no_grad():
        position_ids = padding_position_ids(mask.bool())
        fresh = otter(output.sequences, attention_mask=mask, position_ids=position_ids, use_cache=True)
    cache, expected = output.past_key_values, fresh.past_key_values
    assert len(cache.layers) == len(expected.layers) == otter_cache_layers(otter.config)
    for layer, expected_layer in zip(cache.layers, expected.layers):
        torch.testing.assert_close(layer.keys, expected_layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, expected_layer.values, atol=1e-5, rtol=1e-5)


def test_weight_zero_generates_exactly_what_the_base_model_does(base_name):
    base = make_base(base_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(3, 5, "left")
    greedy = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    expected = base.generate(input_ids, **greedy)
    off = dict(custom_generate=reward_guided_generate, reward_weight=0.0, reward_top_k=TOP_K)
    assert torch.equal(otter.generate(input_ids, **off, **greedy), expected)
    processor = LogitsProcessorList([OtterRewardLogitsProcessor(otter, weight=0.0, top_k=TOP_K)])
    assert torch.equal(otter.generate(input_ids, logits_processor=processor, **greedy), expected)

    sampled = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=True, temperature=1.3)
    torch.manual_seed(3)
    expected = base.generate(input_ids, **sampled)
    torch.manual_seed(3)
    assert torch.equal(otter.generate(input_ids, **off, **sampled), expected)


def test_clear_errors_for_unsupported_uses():
    base = make_base("llama-gqa-tied")
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(1, 5)
    with pytest.raises(TypeError, match="Otter model with a value head"):
        OtterRewardLogitsProcessor(base, weight=1.0)
    with pytest.raises(ValueError, match="top_k"):
        OtterRewardLogitsProcessor(otter, weight=1.0, top_k=0)
    with pytest.raises(ValueError, match="reward_weight"):
        otter.generate(input_ids, custom_generate=reward_guided_generate, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams=1"):
        otter.generate(input_ids, num_beams=2, max_new_tokens=2, **FAST_PATH)
    with otter.otter_disabled(), pytest.raises(ValueError, match="switched off"):
        otter.generate(input_ids, max_new_tokens=2, **FAST_PATH)

    sliding = make_otter(make_base("mistral-sliding"))
    with pytest.raises(ValueError, match="sliding window of 4"):
        sliding.generate(input_ids, max_new_tokens=2, **FAST_PATH)
    with pytest.raises(ValueError, match="sliding window of 4"):
        sliding.generate(input_ids, max_new_tokens=2, logits_processor=guided_processor(sliding))

    tuned = make_otter(make_base("llama4-nope-chunked-moe", **GUIDED_BASES["llama4-nope-chunked-moe"]))
    tuned.config.attn_temperature_tuning = True
    with pytest.raises(ValueError, match="attn_temperature_tuning"):
        tuned.generate(input_ids, max_new_tokens=2, **FAST_PATH)
    with pytest.raises(ValueError, match="attn_temperature_tuning"):
        tuned.generate(input_ids, max_new_tokens=2, logits_processor=guided_processor(tuned))
