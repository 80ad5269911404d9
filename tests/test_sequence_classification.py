"""The sequence-classification view: Auto class resolution, pooling, saving, and TRL's stock trainers using it."""

import json

import pytest
import safetensors.torch
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import otter_hf
from otter_hf import sequence_classification_view
from otter_hf.modeling.sequence_classification import OtterForSequenceClassificationMixin
from tests.helpers import make_base, make_otter, random_batch

PAIRS = [
    ("how was the movie ?", "it was great !", "it was awful ."),
    ("how was the food ?", "so good , thanks !", "so bad , the worst ."),
    ("tell me about your day .", "a lovely day .", "a boring day ."),
    ("what do you think of my idea ?", "a wonderful idea !", "a useless idea ."),
]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_view_pools_the_value_at_the_last_real_token(base_name, padding):
    otter = make_otter(make_base(base_name))
    view = sequence_classification_view(otter)
    assert isinstance(view, OtterForSequenceClassificationMixin) and view.config.num_labels == 1
    assert view.config is not otter.config  # the view's config is its own copy
    assert all(a is b for a, b in zip(view.parameters(), otter.parameters()))

    input_ids, attention_mask = random_batch(3, 8, padding)
    with torch.no_grad():
        value = otter(input_ids, attention_mask=attention_mask).value
        logits = view(input_ids, attention_mask=attention_mask).logits
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)
    assert logits.shape == (3, 1)
    torch.testing.assert_close(logits[:, 0], value[torch.arange(3), last], atol=1e-6, rtol=1e-6)


def test_view_without_mask_pools_the_last_token_that_is_not_padding():
    otter = make_otter(make_base("llama-gqa-tied"))
    view = sequence_classification_view(otter)
    view.config.pad_token_id = 0
    input_ids, attention_mask = random_batch(3, 8, "right")
    with torch.no_grad():
        with_mask = view(input_ids, attention_mask=attention_mask).logits
        without_mask = view(input_ids).logits
    # Causal attention keeps right padding out of every real token's view, so the pad token id finds the same tokens.
    torch.testing.assert_close(without_mask, with_mask)
    labels = torch.zeros(3)
    with torch.no_grad():
        loss = view(input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(loss, (with_mask[:, 0] ** 2).mean())


def test_auto_model_for_sequence_classification_resolves_an_otter_checkpoint(base_name, tmp_path):
    otter = make_otter(make_base(base_name))
    otter.save_pretrained(tmp_path / "causal")

    view = AutoModelForSequenceClassification.from_pretrained(tmp_path / "causal")
    assert isinstance(view, OtterForSequenceClassificationMixin)
    assert view.config.num_labels == 1
    assert {n for n, p in view.named_parameters() if p.requires_grad} == {n for n, _ in otter.otter_named_parameters()}

    view.save_pretrained(tmp_path / "view")
    causal_weights = safetensors.torch.load_file(tmp_path / "causal" / "model.safetensors")
    view_weights = safetensors.torch.load_file(tmp_path / "view" / "model.safetensors")
    assert causal_weights.keys() == view_weights.keys()
    assert all(torch.equal(causal_weights[name], view_weights[name]) for name in causal_weights)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "view")
    assert type(reloaded) is type(otter)
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        assert torch.equal(
            reloaded(input_ids, attention_mask=attention_mask).logits,
            otter(input_ids, attention_mask=attention_mask).logits,
        )


@pytest.mark.parametrize("num_labels", [2, 3])
def test_view_refuses_several_labels(tmp_path, num_labels):
    otter = make_otter(make_base("llama-gqa-tied"))
    # The placeholder two labels every config gets become the one label of the value head.
    assert otter.config.num_labels == 1
    otter.save_pretrained(tmp_path)
    # Two labels are the placeholder's count too: asked for explicitly, they are refused, never silently dropped.
    with pytest.raises(ValueError, match="num_labels` must be 1; got " + str(num_labels)):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=num_labels)
    config_class = type(otter.config)
    with pytest.raises(ValueError, match="num_labels` must be 1; got " + str(num_labels)):
        config_class(**{**otter.config.to_dict(), "num_labels": num_labels})
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).config.num_labels == 1
    with pytest.raises(TypeError, match="Otter causal LM"):
        sequence_classification_view(make_base("llama-gqa-tied"))


def test_trl_reward_script_trains_an_otter_checkpoint_unchanged(tmp_path, tiny_tokenizer):
    from trl.scripts.reward import main, make_parser

    torch.manual_seed(0)
    otter = otter_hf.insert(make_base("llama-gqa-tied"))
    otter.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as file:
        for prompt, chosen, rejected in PAIRS * 3:
            file.write(json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")

    arguments = [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--dataset_name",
        str(data_dir),
        "--output_dir",
        str(tmp_path / "trained"),
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "3e-3",
        "--bf16",
        "False",
        "--use_cpu",
        "True",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "True",
    ]
    main(*make_parser().parse_args_and_config(args=arguments, fail_with_unknown_args=False))

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert type(trained) is type(otter)
    original, updated = otter.state_dict(), trained.state_dict()
    inserted = {name for name, _ in otter.otter_named_parameters()}
    assert all(torch.equal(original[name], updated[name]) for name in original if name not in inserted)
    assert any(not torch.equal(original[name], updated[name]) for name in inserted)


def test_grpo_scores_completions_with_an_otter_reward_model(tmp_path, tiny_tokenizer):
    from trl import GRPOConfig, GRPOTrainer

    policy = make_base("llama-mha-untied")
    reward_model = sequence_classification_view(make_otter(make_base("qwen2-bias")))
    prompts = Dataset.from_list([{"prompt": prompt} for prompt, _, _ in PAIRS])
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_model,
        args=args,
        train_dataset=prompts,
        processing_class=tiny_tokenizer,
        reward_processing_classes=tiny_tokenizer,
    )
    trainer.train()
    logged = next(log for log in trainer.state.log_history if any(key.startswith("rewards/") for key in log))
    means = [value for key, value in logged.items() if key.startswith("rewards/") and key.endswith("/mean")]
    stds = [value for key, value in logged.items() if key.startswith("rewards/") and key.endswith("/std")]
    assert len(means) == 1 and torch.isfinite(torch.tensor(means[0]))
    assert stds[0] > 0  # the completions got the reward model's differing scores, not a constant
