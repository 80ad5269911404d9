"""OtterRewardTrainer and OtterValueTrainer on tiny models: what trains, what stays frozen, datasets, saving."""

import json
import os
import re
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl.data_utils import unpair_preference_dataset

import otter_hf
from otter_hf import load_preference_dataset, sequence_classification_view
from otter_hf.trainers import OtterRewardConfig, OtterRewardTrainer, OtterValueConfig, OtterValueTrainer
from otter_hf.trainers.value_trainer import prefix_weights
from tests.helpers import (
    ARCHITECTURE_BASES,
    BAD,
    GOOD,
    QUESTIONS,
    conversational_pairs,
    make_base,
    random_batch,
    trainer_config,
)


def make_otter(base):
    # Trained models start from the insertion's own initialisation, as a user's would.
    torch.manual_seed(0)
    return otter_hf.insert(base)


def reward_config(tmp_path, **overrides) -> OtterRewardConfig:
    return trainer_config(OtterRewardConfig, tmp_path, **overrides)


def value_config(tmp_path, **overrides) -> OtterValueConfig:
    return trainer_config(OtterValueConfig, tmp_path, **overrides)


def base_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def base_logits(model):
    input_ids, attention_mask = random_batch(2, 10, "right")
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits, (input_ids, attention_mask)


# -- OtterRewardTrainer -----------------------------------------------------------------------------------------


# The tiny GPT-2 (inserted heads of 16 dimensions) and the tiny Llama 4 (5 of 6 eval pairs ordered after the
# default steps) need more steps to separate every pair.
REWARD_TRAINING_OVERRIDES = {
    "gpt2-layernorm": {"max_steps": 24},
    "llama4-nope-chunked-moe": {"max_steps": 24},
}


@pytest.mark.parametrize("name", ARCHITECTURE_BASES)
def test_reward_trainer_trains_only_inserted_parameters(name, tmp_path, tiny_tokenizer):
    base = make_base(name)
    input_ids, attention_mask = random_batch(2, 10, "right")
    with torch.no_grad():
        original_logits = base(input_ids, attention_mask=attention_mask).logits
    otter = make_otter(base)
    frozen_before = base_state(otter)
    inserted_before = {n: p.detach().clone() for n, p in otter.otter_named_parameters()}
    dataset = conversational_pairs()

    trainer = OtterRewardTrainer(
        otter,
        args=reward_config(tmp_path, **REWARD_TRAINING_OVERRIDES.get(name, {})),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    accuracy_before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    metrics = trainer.evaluate()

    assert {"eval_accuracy", "eval_margin", "eval_mean_reward"} <= metrics.keys()
    assert any("accuracy" in log and "margin" in log for log in trainer.state.log_history)
    assert metrics["eval_accuracy"] == 1.0 and metrics["eval_accuracy"] > accuracy_before - 1e-9
    assert metrics["eval_margin"] > 0
    # The model passed in is the one trained; its base is untouched, its original logits exact.
    assert all(torch.equal(p, frozen_before[n]) for n, p in otter.named_parameters() if n in frozen_before)
    assert frozen_before.keys() == {n for n, _ in otter.named_parameters()} - inserted_before.keys()
    assert any(not torch.equal(p, inserted_before[n]) for n, p in otter.otter_named_parameters())
    assert not torch.equal(otter.v_head.summary.weight, inserted_before["v_head.summary.weight"])
    with torch.no_grad():
        assert torch.equal(otter(input_ids, attention_mask=attention_mask).logits, original_logits)


def test_reward_trainer_rewards_are_the_value_at_the_last_real_token(tmp_path, tiny_tokenizer):
    otter = make_otter(make_base("mistral-sliding"))
    trainer = OtterRewardTrainer(
        otter, args=reward_config(tmp_path), train_dataset=conversational_pairs(4), processing_class=tiny_tokenizer
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["attention_mask"] == 0).any()  # right padding is present
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
        value = otter(batch["input_ids"], attention_mask=batch["attention_mask"]).value
    last = batch["attention_mask"].sum(-1) - 1
    torch.testing.assert_close(outputs.logits.squeeze(-1), value[torch.arange(8), last], atol=1e-5, rtol=1e-5)


def test_reward_trainer_accepts_standard_text_with_margin(tmp_path, tiny_tokenizer):
    otter = make_otter(make_base("llama-mha-untied"))
    rows = [{"chosen": f"{q} {g}", "rejected": f"{q} {b}", "margin": 0.5} for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    trainer = OtterRewardTrainer(
        otter,
        args=reward_config(tmp_path, max_steps=2),
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
    )
    assert trainer.train_dataset[0]["chosen_ids"][-1] == tiny_tokenizer.eos_token_id
    assert "margin" in trainer.data_collator([trainer.train_dataset[0]])
    trainer.train()


def test_reward_trainer_refuses_a_model_that_is_not_otter(tmp_path, tiny_tokenizer):
    with pytest.raises(TypeError, match="otter_hf.insert"):
        OtterRewardTrainer(
            make_base("llama-gqa-tied"),
            args=reward_config(tmp_path),
            train_dataset=conversational_pairs(4),
            processing_class=tiny_tokenizer,
        )


@pytest.mark.parametrize(
    ("trainer_class", "config_class", "heads", "insert_option"),
    [
        ("OtterTokenRewardTrainer", "OtterTokenRewardConfig", {"token_reward_head": True}, "token_reward_head=True"),
        ("OtterExpertTrainer", "OtterExpertConfig", {"expert_heads": True}, "expert_heads=True"),
        ("OtterDraftTrainer", "OtterDraftConfig", {"num_recurrent_drafts": 2}, "num_recurrent_drafts=5"),
    ],
)
def test_head_trainers_refuse_a_model_without_their_heads_or_its_classification_view(
    trainer_class, config_class, heads, insert_option, tmp_path, tiny_tokenizer
):
    trainer_class, config_class = getattr(otter_hf, trainer_class), getattr(otter_hf, config_class)
    dataset = Dataset.from_dict({"text": ["i love this movie"]})
    args = config_class(str(tmp_path), report_to=[])
    with pytest.raises(ValueError, match=f"no .* to train: .*{re.escape(insert_option)}"):
        trainer_class(make_otter(make_base("llama-gqa-tied")), args, train_dataset=dataset)
    view = sequence_classification_view(otter_hf.insert(make_base("llama-gqa-tied"), **heads))
    with pytest.raises(ValueError, match="not of its sequence-classification view"):
        trainer_class(view, args, train_dataset=dataset, processing_class=tiny_tokenizer)


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "how", "response": "great", "rejected": "awful"}],
            r"no `chosen` column.*`chosen` and `rejected`.*\['prompt', 'rejected', 'response'\]",
        ),
        ([{"text": "great"}], r"no `chosen`, `rejected` column"),
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
        ([{"chosen": "great", "rejected": "awful", "margin": "big"}], "`margin` column .* numbers"),
    ],
)
def test_reward_trainer_rejects_wrong_columns_before_training(rows, message, tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=message):
        OtterRewardTrainer(
            make_otter(make_base("llama-gqa-tied")),
            args=reward_config(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer,
        )


def test_trained_reward_model_saves_and_reloads_with_the_same_values(tmp_path, tiny_tokenizer):
    otter = make_otter(make_base("qwen2-bias"))
    trainer = OtterRewardTrainer(
        otter,
        args=reward_config(tmp_path, max_steps=4),
        train_dataset=conversational_pairs(8),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    otter.save_otter(tmp_path / "inserted")
    # The training arguments are kept as JSON, not as transformers' pickle.
    assert not [name for name in os.listdir(tmp_path / "saved") if name.endswith((".bin", ".pt", ".pth"))]
    assert json.loads((tmp_path / "saved" / "training_args.json").read_text())["max_steps"] == 4
    # Saved as the causal LM that trained, not as the view TRL trained on: it generates with a cache by default.
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_config["architectures"] == [type(otter).__name__]
    assert saved_config["use_cache"] is True

    input_ids, attention_mask = random_batch(3, 9, "left")
    with torch.no_grad():
        expected = otter(input_ids, attention_mask=attention_mask)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(input_ids, attention_mask=attention_mask)
    assert torch.equal(reloaded.logits, expected.logits)
    real = attention_mask.bool()
    torch.testing.assert_close(reloaded.value[real], expected.value[real], atol=1e-5, rtol=1e-5)

    reattached = otter_hf.load_otter(make_base("qwen2-bias"), tmp_path / "inserted")
    with torch.no_grad():
        value = reattached(input_ids, attention_mask=attention_mask).value
    torch.testing.assert_close(value[real], expected.value[real], atol=1e-5, rtol=1e-5)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one_without_pickles(tmp_path, tiny_tokenizer):
    """Checkpoints hold the optimizer, scheduler and random generators as safetensors, and resuming restores them:
    the last two steps then repeat the uninterrupted run's exactly (a fresh optimizer would not)."""
    pairs = conversational_pairs(16)

    def run(output_dir, resume_from=None, **overrides):
        otter = make_otter(make_base("llama-gqa-tied"))
        args = reward_config(tmp_path, output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2)
        trainer = OtterRewardTrainer(otter, args=args, train_dataset=pairs, processing_class=tiny_tokenizer)
        trainer.train(resume_from_checkpoint=resume_from)
        return dict(otter.otter_named_parameters())

    uninterrupted = run(tmp_path / "uninterrupted")
    checkpoint = tmp_path / "uninterrupted" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {
        "optimizer.safetensors",
        "scheduler.safetensors",
        "rng_state.safetensors",
        "otter_model.safetensors",
    } <= files
    assert not [name for name in files if name.endswith((".pt", ".pth", ".bin"))]
    resumed = run(tmp_path / "resumed", resume_from=str(checkpoint))
    assert all(torch.equal(resumed[name], parameter) for name, parameter in uninterrupted.items())

    # A checkpoint whose optimizer state is a pickle is refused, not unpickled.
    crafted = tmp_path / "crafted"
    shutil.copytree(checkpoint, crafted)
    (crafted / "optimizer.safetensors").unlink()
    (crafted / "optimizer.pt").write_bytes(b"a pickle would run code here")
    with pytest.raises(ValueError, match=r"pickles \(optimizer.pt\).*does not unpickle.*load_otter"):
        run(tmp_path / "refused", resume_from=str(crafted))


def test_random_generators_and_optimizer_state_come_back_from_safetensors_as_they_were(tmp_path):
    import random

    import numpy as np

    from otter_hf.trainers.trainer_state import capture_rng_states, load_state, restore_rng_states, save_state

    save_state(capture_rng_states(distributed=False), tmp_path / "rng.safetensors")
    drawn = random.random(), np.random.rand(3).tolist(), torch.rand(3)
    restore_rng_states(load_state(tmp_path / "rng.safetensors"), distributed=False)
    assert (random.random(), np.random.rand(3).tolist()) == drawn[:2] and torch.equal(torch.rand(3), drawn[2])

    parameter = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([parameter], betas=(0.8, 0.99))
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    save_state(optimizer.state_dict(), tmp_path / "optimizer.safetensors")
    loaded = load_state(tmp_path / "optimizer.safetensors")
    assert loaded["param_groups"] == optimizer.state_dict()["param_groups"]  # betas a tuple again, params ints
    assert loaded["state"].keys() == {0} and all(
        torch.equal(tensor, optimizer.state_dict()["state"][0][name]) for name, tensor in loaded["state"][0].items()
    )
    with pytest.raises(TypeError, match="object at `state.step`.*without pickling"):
        save_state({"step": object()}, tmp_path / "other.safetensors")


def test_bundled_preference_set_feeds_the_reward_trainer(tmp_path, tiny_tokenizer):
    train, test = load_preference_dataset("train"), load_preference_dataset("test")
    assert len(train) > 200 and len(test) > 50
    assert train.column_names == ["prompt", "chosen", "rejected"]
    held_out_prompts = {row["prompt"][0]["content"] for row in test}
    assert not held_out_prompts & {row["prompt"][0]["content"] for row in train}
    trainer = OtterRewardTrainer(
        make_otter(make_base("llama-gqa-tied")),
        args=reward_config(tmp_path, max_steps=1),
        train_dataset=train.select(range(8)),
        processing_class=tiny_tokenizer,
    )
    assert len(trainer.train_dataset) == 8
    with pytest.raises(ValueError, match="split"):
        load_preference_dataset("validation")


# -- OtterValueTrainer ------------------------------------------------------------------------------------------


def test_prefix_weights_grow_linearly_and_sum_to_one():
    weights = prefix_weights(5)
    assert sum(weights) == pytest.approx(1.0)
    assert weights == pytest.approx([1 / 15, 2 / 15, 3 / 15, 4 / 15, 5 / 15])


def test_value_trainer_regresses_every_completion_prefix(tmp_path, tiny_tokenizer):
    otter = make_otter(make_base("llama-gqa-tied"))
    frozen_before = base_state(otter)
    logits_before, (input_ids, attention_mask) = base_logits(otter)
    dataset = unpair_preference_dataset(conversational_pairs(12))  # prompt / completion / label (bool)

    trainer = OtterValueTrainer(
        otter,
        args=value_config(tmp_path, max_steps=40, learning_rate=5e-3),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    row = trainer.train_dataset[0]
    prompt_ids = tiny_tokenizer.apply_chat_template(dataset[0]["prompt"], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    prompt_length = len(prompt_ids)
    completion_length = len(row["input_ids"]) - prompt_length
    assert row["value_weights"][:prompt_length] == [0.0] * prompt_length
    assert row["value_weights"][prompt_length:] == pytest.approx(prefix_weights(completion_length))
    assert set(row["value_targets"][prompt_length:]) == {float(dataset[0]["label"])}

    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    assert loss_after < loss_before / 2

    # Values at the last completion token now separate the labels.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        value = otter(batch["input_ids"], attention_mask=batch["attention_mask"]).value
    last = value[torch.arange(len(dataset)), batch["attention_mask"].sum(-1) - 1]
    labels = torch.tensor(dataset["label"])
    assert last[labels].min() > last[~labels].max()
    assert all(torch.equal(p, frozen_before[n]) for n, p in otter.named_parameters() if n in frozen_before)
    with torch.no_grad():
        assert torch.equal(otter(input_ids, attention_mask=attention_mask).logits, logits_before)


def test_value_trainer_step_labels_sit_at_step_ends(tmp_path, tiny_tokenizer):
    rows = [
        {
            "prompt": "how was the day ?",
            "completions": ["it was good .", "i love it !", "so bad ."],
            "labels": [1.0, 0.0, 1.0],
        },
        {"prompt": "what do you think ?", "completions": ["nice idea ."], "labels": [True]},
    ]
    dataset = Dataset.from_list(rows * 4)
    otter = make_otter(make_base("mistral-sliding"))
    trainer = OtterValueTrainer(
        otter, args=value_config(tmp_path, step_separator=" ."), train_dataset=dataset, processing_class=tiny_tokenizer
    )
    row = trainer.train_dataset[0]
    step_ends = [i for i, weight in enumerate(row["value_weights"]) if weight > 0]
    tokens = tiny_tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert [tokens[i] for i in step_ends] == [".", ".", "."]  # the separator closes every step
    assert [row["value_targets"][i] for i in step_ends] == [1.0, 0.0, 1.0]
    assert sum(row["value_weights"]) == pytest.approx(1.0)
    trainer.train()
    assert otter.config.use_cache is True  # the Trainer's use_cache=False stays out of the model and its checkpoints

    last_only = OtterValueTrainer(
        otter,
        args=value_config(tmp_path, train_on_last_step_only=True),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    weights = last_only.train_dataset[0]["value_weights"]
    assert [i for i, weight in enumerate(weights) if weight > 0] == [len(weights) - 1]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "how ?", "completion": "good ."}],
            r"no `label` column.*\['completion', 'prompt'\].*`completion` and `label`",
        ),
        ([{"prompt": "how ?", "completions": ["good ."]}], r"no `labels` column.*`prompt`, `completions`"),
        ([{"text": "good ."}], r"no `completion`, `label` column"),
        (
            [{"prompt": "how ?", "completions": ["good .", "bad ."], "labels": [1.0]}],
            "one label per step.*2 completions and 1 labels",
        ),
        ([{"completion": "good .", "label": "yes"}], "`label` must be a number"),
    ],
)
def test_value_trainer_rejects_wrong_columns_before_training(rows, message, tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=message):
        OtterValueTrainer(
            make_otter(make_base("llama-gqa-tied")),
            args=value_config(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer,
        )


def test_value_trainer_refuses_other_models(tmp_path, tiny_tokenizer):
    dataset = Dataset.from_list([{"completion": "good .", "label": 1.0}])
    with pytest.raises(TypeError, match="otter_hf.insert"):
        OtterValueTrainer(
            make_base("llama-gqa-tied"),
            args=value_config(tmp_path),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
    view = sequence_classification_view(make_otter(make_base("llama-gqa-tied")))
    with pytest.raises(TypeError, match="causal LM"):
        OtterValueTrainer(view, args=value_config(tmp_path), train_dataset=dataset, processing_class=tiny_tokenizer)


def test_reward_trainer_batches_pairs_of_similar_length(tmp_path, tiny_tokenizer):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    args = reward_config(tmp_path, max_steps=1)
    assert args.train_sampling_strategy == "group_by_length"
    # transformers 5.23 renamed the option `activation_checkpointing`; off under either name.
    assert not getattr(args, "activation_checkpointing", False) and not args.gradient_checkpointing
    # Pairs from a real HH-RLHF slice differ widely in length; each gets the length of its longer sequence.
    pairs = otter_hf.load_hh_rlhf("tests/data/hh-harmless-slice.jsonl")
    trainer = OtterRewardTrainer(
        make_otter(make_base("llama-gqa-tied")), args=args, train_dataset=pairs, processing_class=tiny_tokenizer
    )
    lengths = trainer.train_dataset["length"]
    assert lengths == [
        max(len(c), len(r)) for c, r in zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"])
    ]
    assert isinstance(
        trainer._get_train_sampler(trainer._remove_unused_columns(trainer.train_dataset)), LengthGroupedSampler
    )
    trainer.train()  # the length column reaches the collator without breaking it
