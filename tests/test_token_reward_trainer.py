"""OtterTokenRewardTrainer: GenARM's loss on the token-level reward head, on TRL's preference datasets."""

import pytest
import torch
from datasets import Dataset

import otter_hf
from otter_hf.trainers import OtterTokenRewardConfig, OtterTokenRewardTrainer, token_reward_log_probs
from otter_hf.trainers.token_reward_trainer import tokenize_preference_row
from tests.helpers import BAD, GOOD, QUESTIONS, conversational_pairs, make_base, random_batch, trainer_config


def make_token_otter(name: str = "llama-gqa-tied"):
    torch.manual_seed(0)
    return otter_hf.insert(make_base(name), token_reward_head=True)


def token_reward_config(tmp_path, **overrides) -> OtterTokenRewardConfig:
    return trainer_config(OtterTokenRewardConfig, tmp_path, **{"beta": 0.5, **overrides})


@pytest.mark.parametrize("name", ["llama-gqa-tied", "gemma3-sliding-softcap", "gpt2-layernorm"])
def test_training_separates_the_pairs_and_leaves_the_base_untouched(name, tmp_path, tiny_tokenizer):
    otter = make_token_otter(name)
    input_ids, attention_mask = random_batch(2, 10, "right")
    with torch.no_grad():
        original_logits = otter(input_ids, attention_mask=attention_mask).logits
    base_before = {n: p.detach().clone() for n, p in otter.named_parameters() if not p.requires_grad}
    dataset = conversational_pairs()
    trainer = OtterTokenRewardTrainer(
        otter,
        args=token_reward_config(tmp_path),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    # Zero-initialised, the reward policy is the base policy: the chosen and rejected answers' rewards are the base
    # model's log-probabilities, which training must move apart in the preferred direction.
    assert after["eval_rewards/accuracies"] == 1.0
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]
    assert after["eval_loss"] < before["eval_loss"]
    assert any("rewards/accuracies" in log and "logps/chosen" in log for log in trainer.state.log_history)
    assert otter.token_reward_head.proj.weight.abs().sum() > 0
    assert all(torch.equal(p, base_before[n]) for n, p in otter.named_parameters() if n in base_before)
    with torch.no_grad():
        assert torch.equal(otter(input_ids, attention_mask=attention_mask).logits, original_logits)


def test_log_probs_sum_the_reward_policy_over_completion_tokens_only():
    otter = make_token_otter("qwen2-bias")
    with torch.no_grad():
        torch.nn.init.normal_(otter.token_reward_head.proj.weight, std=1.0)
    input_ids, attention_mask = random_batch(3, 9, "right")
    # Completions start at different positions and stop at each row's padding.
    completion_mask = torch.zeros_like(attention_mask)
    for row, start in enumerate((3, 5, 4)):
        completion_mask[row, start:] = attention_mask[row, start:]
    with torch.no_grad():
        got = token_reward_log_probs(otter, input_ids, attention_mask, completion_mask)
        reward_logits = otter(
            input_ids, attention_mask=attention_mask, output_token_reward_logits=True
        ).token_reward_logits
    log_probs = reward_logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    expected = (log_probs * completion_mask[:, 1:]).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_conversational_rows_split_where_the_answer_starts(tiny_tokenizer):
    row = conversational_pairs(1)[0]
    tokens = tokenize_preference_row(row, tiny_tokenizer)
    prompt_ids = tiny_tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)
    prompt_ids = list(prompt_ids["input_ids"]) if hasattr(prompt_ids, "keys") else list(prompt_ids)
    assert tokens["prompt_ids"] == prompt_ids
    for answer in ("chosen", "rejected"):
        full = tiny_tokenizer.apply_chat_template(row["prompt"] + row[answer])
        full = list(full["input_ids"]) if hasattr(full, "keys") else list(full)
        assert tokens["prompt_ids"] + tokens[f"{answer}_ids"] == full


def test_text_pairs_with_an_implicit_prompt_train(tmp_path, tiny_tokenizer):
    rows = [
        {"chosen": f"{QUESTIONS[i % 4]} {GOOD[i % 5]}", "rejected": f"{QUESTIONS[i % 4]} {BAD[i % 5]}"}
        for i in range(8)
    ]
    trainer = OtterTokenRewardTrainer(
        make_token_otter(),
        args=token_reward_config(tmp_path, max_steps=2),
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
    )
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] and first["chosen_ids"][-1] == tiny_tokenizer.eos_token_id
    assert first["length"] == len(first["prompt_ids"]) + max(len(first["chosen_ids"]), len(first["rejected_ids"]))
    trainer.train()


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "how", "response": "great", "rejected": "awful"}],
            r"no `chosen` column.*`prompt_ids`, `chosen_ids` and `rejected_ids`",
        ),
        (
            [
                {
                    "prompt": "how was it ?",
                    "chosen": [{"role": "assistant", "content": "great"}],
                    "rejected": [{"role": "assistant", "content": "awful"}],
                }
            ],
            "all be text or all be lists",
        ),
    ],
)
def test_wrong_columns_fail_before_training(rows, message, tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=message):
        OtterTokenRewardTrainer(
            make_token_otter(),
            args=token_reward_config(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer,
        )


def test_a_model_without_the_head_or_a_bad_beta_is_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="token_reward_head=True"):
        OtterTokenRewardTrainer(
            otter_hf.insert(make_base("llama-gqa-tied")),
            args=token_reward_config(tmp_path),
            train_dataset=conversational_pairs(),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(ValueError, match="`beta` must be positive"):
        token_reward_config(tmp_path, beta=0.0)
