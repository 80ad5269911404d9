"""The demo's scoring pieces on a tiny model: the guide's rewards and the judge's features, and the judge's fit."""

import torch

from otter_hf.demo import LinearJudge, rewards_and_features
from tests.helpers import make_base, make_otter

CONVERSATIONS = [
    [{"role": "user", "content": "tell me about the film"}, {"role": "assistant", "content": "it was great"}],
    [
        {"role": "user", "content": "how was your day"},
        {"role": "assistant", "content": "good , thanks ! i really enjoyed it"},
    ],
    [{"role": "user", "content": "write a review"}, {"role": "assistant", "content": "awful"}],
]


def test_batched_rewards_and_features_equal_one_conversation_at_a_time(tiny_tokenizer):
    otter = make_otter(make_base("llama-gqa-tied")).eval()
    rewards, features = rewards_and_features(otter, tiny_tokenizer, CONVERSATIONS)
    for index, messages in enumerate(CONVERSATIONS):
        input_ids = tiny_tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            outputs = otter(input_ids, output_hidden_states=True)
            with otter.otter_disabled():
                base_hidden = otter(input_ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(rewards[index], outputs.value[0, -1])
        # The judge reads the original stream only, which the inserted parameters never change.
        torch.testing.assert_close(features[index], base_hidden[0].mean(0))

    with otter.otter_disabled():
        no_rewards, base_features = rewards_and_features(otter, tiny_tokenizer, CONVERSATIONS)
    assert no_rewards is None
    torch.testing.assert_close(base_features, features)


def test_judge_ranks_held_out_pairs_along_the_preferred_direction():
    generator = torch.Generator().manual_seed(0)
    preferred = torch.randn(16, generator=generator)
    rejected = torch.randn(400, 16, generator=generator) * 3.0
    chosen = rejected + preferred + torch.randn(400, 16, generator=generator) * 0.5
    judge = LinearJudge(chosen[:300], rejected[:300])
    accuracy = (judge(chosen[300:]) > judge(rejected[300:])).float().mean()
    assert accuracy > 0.9
    assert not any(parameter.requires_grad for parameter in judge.parameters())
