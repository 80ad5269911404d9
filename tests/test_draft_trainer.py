import pytest
import torch
from datasets import Dataset

import otter_hf
from otter_hf.trainers import (
    DataCollatorForDraftHeads,
    OtterDraftTrainer,
    build_self_distillation_dataset,
)
from otter_hf.trainers.draft_trainer import draft_head_loss
from tests.helpers import ARCHITECTURE_BASES, EOS, PAD, draft_config, make_base


def test_loss_scores_head_k_at_t_on_token_t_plus_k_plus_2():
    vocab = 7
    lm_head = torch.nn.Identity()  # hidden states are the logits
    input_ids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    # Head 0 puts all its mass on the token two positions ahead, head 1 on the token one position ahead (wrong).
    draft_hidden = torch.full((1, 6, 2, vocab), -30.0)
    for t in range(6):
        draft_hidden[0, t, 0, min(t + 2, 6)] = 30.0
        draft_hidden[0, t, 1, min(t + 1, 6)] = 30.0
    loss, accuracy = draft_head_loss(draft_hidden, lm_head, input_ids, torch.ones_like(input_ids))
    assert accuracy.tolist() == [1.0, 0.0]
    # Head 0 is exact (loss ~0), head 1 is confidently wrong: the mean over heads is half of head 1's loss.
    torch.testing.assert_close(loss, torch.tensor(60.0 / 2), atol=1e-3, rtol=1e-3)
    # Targets that are masked out (padding, prompt) are not scored.
    only_last = torch.tensor([[0, 0, 0, 0, 0, 1]])
    _, accuracy = draft_head_loss(draft_hidden, lm_head, input_ids, only_last)
    assert accuracy.tolist() == [1.0, 0.0]


def test_collator_masks_padding_and_context_tokens():
    collator = DataCollatorForDraftHeads(pad_token_id=PAD)
    batch = collator([{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}, {"input_ids": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["target_mask"].tolist() == [[0, 1, 1], [1, 1, 0]]


def self_distilled(model, tokenizer):
    prompts = ["tell me about the movie", "write a review of my trip", "how was your day", "what is a good book"]
    return build_self_distillation_dataset(model, tokenizer, prompts, max_new_tokens=10, batch_size=3)


def test_self_distillation_dataset_holds_the_base_models_greedy_continuations(tiny_tokenizer):
    base = make_base("llama-gqa-tied")
    model = otter_hf.insert(base, num_draft_heads=2)
    with torch.no_grad():  # a non-zero inserted stream must not change what the base generates
        for parameter in model.otter_parameters():
            parameter.add_(torch.randn_like(parameter))
    dataset = self_distilled(model, tiny_tokenizer)
    assert dataset.column_names == ["input_ids", "completion_mask"]
    for row in dataset:
        prompt_length = row["completion_mask"].index(1)
        prompt = torch.tensor([row["input_ids"][:prompt_length]])
        reference = base.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10)[
            0
        ].tolist()
        if EOS in reference[prompt_length:]:
            reference = reference[: reference.index(EOS, prompt_length) + 1]
        assert row["input_ids"] == reference
        assert row["completion_mask"] == [0] * prompt_length + [1] * (len(reference) - prompt_length)


@pytest.mark.parametrize("name", ARCHITECTURE_BASES)
def test_training_improves_draft_heads_and_touches_only_inserted_parameters(name, tmp_path, tiny_tokenizer):
    base = make_base(name)
    model = otter_hf.insert(base, num_draft_heads=3)
    dataset = self_distilled(model, tiny_tokenizer)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = OtterDraftTrainer(
        model,
        draft_config(tmp_path, max_steps=30),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    assert {f"eval_draft_accuracy_head_{k}" for k in range(3)} <= set(after)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, original[name])}
    assert any(name.startswith("draft_heads.") for name in changed)
    assert any("inserted_" in name for name in changed)
    assert all(otter_hf.modeling.modeling_otter.is_inserted_parameter(name) for name in changed)


def test_text_column_is_tokenised(tmp_path, tiny_tokenizer):
    model = otter_hf.insert(make_base("llama-gqa-tied"), num_draft_heads=2)
    dataset = Dataset.from_dict({"text": ["i love this movie so much", "the food was great and the service kind"]})
    trainer = OtterDraftTrainer(
        model, draft_config(tmp_path, max_steps=1), train_dataset=dataset, processing_class=tiny_tokenizer
    )
    assert trainer.train_dataset[0]["input_ids"] == tiny_tokenizer("i love this movie so much")["input_ids"]
    trainer.train()


def test_refuses_wrong_models_and_columns(tmp_path, tiny_tokenizer):
    dataset = Dataset.from_dict({"text": ["i love this movie"]})
    with pytest.raises(TypeError, match="Otter model"):
        OtterDraftTrainer(
            make_base("llama-gqa-tied"), draft_config(tmp_path), train_dataset=dataset, processing_class=tiny_tokenizer
        )
    with pytest.raises(ValueError, match="no draft heads"):
        OtterDraftTrainer(
            otter_hf.insert(make_base("llama-gqa-tied")),
            draft_config(tmp_path),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
    model = otter_hf.insert(make_base("llama-gqa-tied"), num_draft_heads=2)
    wrong = Dataset.from_dict({"prompt": ["hi"], "completion": ["hello"]})
    with pytest.raises(ValueError, match=r"neither a `text` nor an `input_ids` column.*\['completion', 'prompt'\]"):
        OtterDraftTrainer(model, draft_config(tmp_path), train_dataset=wrong, processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="eval dataset"):
        OtterDraftTrainer(
            model, draft_config(tmp_path), train_dataset=dataset, eval_dataset=wrong, processing_class=tiny_tokenizer
        )


def test_trained_draft_heads_are_saved_and_loaded(tmp_path, tiny_tokenizer):
    base = make_base("llama-gqa-tied")
    model = otter_hf.insert(base, num_draft_heads=2)
    OtterDraftTrainer(
        model,
        draft_config(tmp_path / "run", max_steps=2),
        train_dataset=self_distilled(model, tiny_tokenizer),
        processing_class=tiny_tokenizer,
    ).train()
    model.save_otter(tmp_path / "otter")
    loaded = otter_hf.load_otter(base, tmp_path / "otter")
    assert loaded.config.num_draft_heads == 2
    for (name, trained), (_, reloaded) in zip(
        model.draft_heads.named_parameters(), loaded.draft_heads.named_parameters()
    ):
        assert torch.equal(trained, reloaded), name
