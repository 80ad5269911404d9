"""Decoding guided by the token-level reward head, through plain `generate()` arguments."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from otter_hf.generation import reward_guided_generate
from otter_hf.modeling.loop_inputs import padding_position_ids
from tests.helpers import EOS, make_base, make_otter, random_batch
from tests.test_expert_heads import make_expert_otter, reference_dexperts_greedy

WEIGHT = 2.0
NEW_TOKENS = 6


def make_token_otter(base_name: str):
    otter = make_otter(make_base(base_name), token_reward_head=True)
    # Inserted at zero, the head would leave every guided token as the base model's.
    with torch.no_grad():
        torch.nn.init.normal_(otter.token_reward_head.proj.weight, std=1.0)
    return otter


def reference_guided_greedy(otter, input_ids, attention_mask, steps: int, weight: float):
    """Guided greedy decoding spelled out: full forwards without a cache, logits + weight * log pi_r, never the end
    of sequence."""
    for _ in range(steps):
        position_ids = padding_position_ids(attention_mask.bool())
        with torch.no_grad():
            outputs = otter(
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                output_token_reward_logits=True,
            )
        scores = outputs.logits[:, -1] + weight * outputs.token_reward_logits[:, -1].log_softmax(-1)
        scores[:, EOS] = -torch.inf  # never the end of sequence, as `min_new_tokens` keeps it
        input_ids = torch.cat([input_ids, scores.argmax(-1, keepdim=True)], dim=-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
    return input_ids


GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def test_guided_greedy_adds_the_weighted_reward_log_probs_of_the_same_forward(base_name):
    otter = make_token_otter(base_name)
    input_ids, attention_mask = random_batch(3, 5, "left")
    generated = otter.generate(input_ids, attention_mask=attention_mask, token_reward_weight=WEIGHT, **GREEDY)
    expected = reference_guided_greedy(otter, input_ids, attention_mask, NEW_TOKENS, WEIGHT)
    assert torch.equal(generated, expected)
    unguided = otter.generate(input_ids, attention_mask=attention_mask, **GREEDY)
    assert not torch.equal(generated, unguided)


# The per-token guidances of `generate()` share their decoding machinery: each keyword with its heads and its
# reference decoding spelled out.
PER_TOKEN_GUIDANCES = {
    "token_reward_weight": (make_token_otter, reference_guided_greedy),
    "expert_weight": (make_expert_otter, reference_dexperts_greedy),
}


@pytest.mark.parametrize("keyword", PER_TOKEN_GUIDANCES)
def test_weight_zero_generates_exactly_what_the_base_model_does(base_name, keyword):
    make_guided_otter, _ = PER_TOKEN_GUIDANCES[keyword]
    otter = make_guided_otter(base_name)
    base = make_base(base_name)  # seeded: the same weights as the one inserted into
    input_ids, attention_mask = random_batch(3, 5, "left")
    for settings in (GREEDY, dict(max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)):
        expected = base.generate(input_ids, attention_mask=attention_mask, **settings)
        assert torch.equal(
            otter.generate(input_ids, attention_mask=attention_mask, **{keyword: 0}, **settings), expected
        )


@pytest.mark.parametrize("keyword", PER_TOKEN_GUIDANCES)
def test_sampling_warpers_act_on_the_guided_scores(keyword):
    make_guided_otter, _ = PER_TOKEN_GUIDANCES[keyword]
    otter = make_guided_otter("llama-gqa-tied")
    input_ids, attention_mask = random_batch(2, 5, "left")
    greedy = otter.generate(input_ids, attention_mask=attention_mask, **{keyword: WEIGHT}, **GREEDY)
    # top_k=1 after the guidance keeps only the guided best token; before it, the base model's best token.
    sampled = otter.generate(
        input_ids,
        attention_mask=attention_mask,
        **{keyword: WEIGHT},
        do_sample=True,
        top_k=1,
        temperature=0.7,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("keyword", PER_TOKEN_GUIDANCES)
def test_beam_search_scores_with_the_guided_policy(keyword):
    make_guided_otter, reference_greedy = PER_TOKEN_GUIDANCES[keyword]
    otter = make_guided_otter("qwen2-bias")
    input_ids, attention_mask = random_batch(2, 5, "left")
    settings = dict(max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    guided = otter.generate(
        input_ids,
        attention_mask=attention_mask,
        **{keyword: WEIGHT},
        output_scores=True,
        return_dict_in_generate=True,
        **settings,
    )
    unguided = otter.generate(
        input_ids, attention_mask=attention_mask, output_scores=True, return_dict_in_generate=True, **settings
    )
    assert guided.sequences.shape == unguided.sequences.shape == (4, 5 + NEW_TOKENS)
    assert not torch.equal(guided.sequences_scores, unguided.sequences_scores)
    # One beam is one guided greedy path: beam search with a single beam repeats it.
    single_beam = otter.generate(input_ids, attention_mask=attention_mask, **{keyword: WEIGHT}, num_beams=1, **GREEDY)
    assert torch.equal(single_beam, reference_greedy(otter, input_ids, attention_mask, NEW_TOKENS, WEIGHT))


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).clone())

    def end(self):
        pass


@pytest.mark.parametrize("keyword", PER_TOKEN_GUIDANCES)
def test_streamer_receives_the_guided_tokens(keyword):
    make_guided_otter, _ = PER_TOKEN_GUIDANCES[keyword]
    otter = make_guided_otter("mistral-sliding")
    input_ids, attention_mask = random_batch(1, 5)
    streamer = CollectingStreamer()
    generated = otter.generate(
        input_ids, attention_mask=attention_mask, **{keyword: WEIGHT}, streamer=streamer, **GREEDY
    )
    assert torch.equal(torch.cat(streamer.chunks), generated[0])
    assert not torch.equal(generated, otter.generate(input_ids, attention_mask=attention_mask, **GREEDY))


def test_the_hooks_are_gone_after_generate():
    otter = make_token_otter("llama-gqa-tied")
    input_ids, attention_mask = random_batch(1, 4)
    otter.generate(input_ids, attention_mask=attention_mask, token_reward_weight=WEIGHT, **GREEDY)
    assert not otter._forward_hooks and not otter._forward_pre_hooks
    with torch.no_grad():
        assert otter(input_ids, attention_mask=attention_mask).token_reward_logits is None


def test_reward_weight_runs_the_args_fast_path():
    otter = make_otter(make_base("llama-gqa-tied"))
    input_ids, attention_mask = random_batch(2, 5, "left")
    plain_arguments = otter.generate(
        input_ids, attention_mask=attention_mask, reward_weight=3.0, reward_top_k=4, **GREEDY
    )
    custom = otter.generate(
        input_ids,
        attention_mask=attention_mask,
        custom_generate=reward_guided_generate,
        reward_weight=3.0,
        reward_top_k=4,
        **GREEDY,
    )
    assert torch.equal(plain_arguments, custom)
    assert not torch.equal(plain_arguments, otter.generate(input_ids, attention_mask=attention_mask, **GREEDY))


def test_clear_errors():
    input_ids, attention_mask = random_batch(1, 4)
    without_head = make_otter(make_base("llama-gqa-tied"))
    with pytest.raises(ValueError, match="token_reward_head=True"):
        without_head.generate(input_ids, attention_mask=attention_mask, token_reward_weight=1.0)
    otter = make_token_otter("llama-gqa-tied")
    with pytest.raises(ValueError, match="not both"):
        otter.generate(input_ids, token_reward_weight=1.0, reward_weight=1.0)
    with pytest.raises(ValueError, match="must be a finite number"):
        otter.generate(input_ids, token_reward_weight="1")
    with pytest.raises(ValueError, match="pass `reward_weight"):
        otter.generate(input_ids, reward_top_k=3)
    with pytest.raises(ValueError, match="switched off"), otter.otter_disabled():
        otter.generate(input_ids, token_reward_weight=1.0)
