"""The recurrent (EAGLE-style) draft head: its teacher-forced output, its drafts, its training and its decoding."""

import pytest
import torch
from datasets import Dataset

import otter_hf
from otter_hf.generation import calibrate_draft_confidence, speculative_generate
from otter_hf.generation.speculative import otter_recurrent_drafts
from otter_hf.trainers import OtterDraftTrainer, fit_draft_vocabulary
from otter_hf.trainers.draft_trainer import RECURRENT_STEP_WEIGHTS, recurrent_draft_loss
from tests.helpers import draft_config, make_base, make_otter, make_tokenizer, random_batch

DRAFT_VOCAB_SIZE = 40
PROMPT_LENGTH, COMPLETION_LENGTH = 6, 16


def recurrent_otter(base, **options):
    return make_otter(base, num_recurrent_drafts=3, draft_vocab_size=DRAFT_VOCAB_SIZE, **options)


def self_distilled(base, num_prompts=4):
    """Random prompts and the base's greedy continuations (no end-of-sequence token: full length)."""
    input_ids, attention_mask = random_batch(num_prompts, PROMPT_LENGTH, seed=7)
    sequences = base.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=COMPLETION_LENGTH
    )
    completion_mask = [[0] * PROMPT_LENGTH + [1] * COMPLETION_LENGTH] * num_prompts
    return Dataset.from_dict({"input_ids": sequences.tolist(), "completion_mask": completion_mask}), sequences


@pytest.mark.parametrize("name", ["llama-gqa-tied", "gemma3-sliding-softcap", "gpt2-layernorm"])
def test_teacher_forced_output_steps_from_each_hidden_state_with_the_next_token(name):
    base = make_base(name)
    otter = recurrent_otter(base)
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        output = otter(
            input_ids, attention_mask=attention_mask, output_hidden_states=True, output_recurrent_draft_logits=True
        )
        expected_logits = base(input_ids, attention_mask=attention_mask).logits
        head = otter.recurrent_draft_head
        hidden = output.hidden_states[-1]
        expected = head.draft_logits(head.step(hidden[:, :-1], otter.token_embeddings(input_ids[:, 1:])))
    assert torch.equal(output.logits, expected_logits)
    assert output.recurrent_draft_logits.shape == (2, 6, DRAFT_VOCAB_SIZE)
    torch.testing.assert_close(output.recurrent_draft_logits, expected)
    # The embeddings it reads are the base model's own rows, without the inserted columns.
    assert torch.equal(otter.token_embeddings(input_ids), base.get_input_embeddings().weight[input_ids])


def test_each_draft_reads_the_previous_one_and_only_draft_vocabulary_tokens_are_proposed():
    base = make_base("llama-gqa-tied")
    otter = recurrent_otter(base)
    head = otter.recurrent_draft_head
    with torch.no_grad():
        head.draft_token_ids.copy_(torch.arange(95, 95 - DRAFT_VOCAB_SIZE, -1))
        input_ids = random_batch(2, 5)[0]
        hidden = otter(input_ids, output_hidden_states=True).hidden_states[-1][:, -2]
        logits = otter_recurrent_drafts(otter)(input_ids, hidden, None)
        assert logits.shape == (2, 3, otter.config.vocab_size)
        outside = torch.ones(otter.config.vocab_size, dtype=torch.bool)
        outside[head.draft_token_ids] = False
        assert torch.isneginf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()
        features, token = hidden, input_ids[:, -1]
        for step in range(3):
            features = head.step(features, otter.token_embeddings(token))
            torch.testing.assert_close(logits[:, step, head.draft_token_ids], head.draft_logits(features))
            token = logits[:, step].argmax(-1)
            assert torch.isin(token, head.draft_token_ids).all()
        # A chain stops after its first draft that no row is confident enough in.
        assert otter_recurrent_drafts(otter, confidence_threshold=0.999)(input_ids, hidden, None).shape[1] == 1


def test_the_loss_scores_only_steps_that_read_and_predict_target_tokens():
    base = make_base("llama-gqa-tied")
    otter = recurrent_otter(base)
    head = otter.recurrent_draft_head
    head.draft_token_ids.copy_(torch.arange(DRAFT_VOCAB_SIZE))
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        hidden = otter(input_ids, output_hidden_states=True).hidden_states[-1]
    # Only the last two tokens are targets: the first step is scored once (at t = 3: it reads token 4 and predicts
    # token 5), the second never (it would read token 4 as a draft of token 3's position, which is context).
    target_mask = torch.tensor([[0, 0, 0, 0, 1, 1]])
    loss, accuracies = recurrent_draft_loss(head, hidden, otter.token_embeddings, input_ids, target_mask, 96)
    features = head.step(hidden[:, 3], otter.token_embeddings(input_ids[:, 4]))
    expected = RECURRENT_STEP_WEIGHTS[0] * torch.nn.functional.cross_entropy(
        head.draft_logits(features), input_ids[:, 5]
    )
    expected = expected + torch.nn.functional.smooth_l1_loss(features, hidden[:, 4])
    torch.testing.assert_close(loss, expected)
    assert accuracies[0] in (0.0, 1.0) and torch.isnan(accuracies[1])
    # A target outside the draft vocabulary adds nothing to the cross-entropy but counts as a miss.
    outside = torch.tensor([[5, 6, 7, 8, 9, 60]])
    with torch.no_grad():
        hidden = otter(outside, output_hidden_states=True).hidden_states[-1]
    loss, accuracies = recurrent_draft_loss(head, hidden, otter.token_embeddings, outside, target_mask, 96)
    features = head.step(hidden[:, 3], otter.token_embeddings(outside[:, 4]))
    torch.testing.assert_close(loss, torch.nn.functional.smooth_l1_loss(features, hidden[:, 4]))
    assert accuracies[0] == 0.0


def test_the_draft_vocabulary_is_fitted_to_the_most_frequent_targets():
    base = make_base("llama-gqa-tied")
    otter = otter_hf.insert(base, num_recurrent_drafts=2, draft_vocab_size=4)
    head = otter.recurrent_draft_head
    assert not head.is_vocabulary_fitted()
    # 9 three times and 8 twice as targets; 7 once; 50 only as context, however often.
    dataset = [
        {"input_ids": [50, 50, 50, 9, 9, 8], "completion_mask": [0, 0, 0, 1, 1, 1]},
        {"input_ids": [50, 9, 8, 7], "completion_mask": [0, 1, 1, 1]},
    ]
    fit_draft_vocabulary(otter, dataset)
    assert head.draft_token_ids.tolist() == [9, 8, 7, 0]
    assert torch.equal(head.lm_head.weight, base.lm_head.weight[[9, 8, 7, 0]])
    assert head.is_vocabulary_fitted()


@pytest.mark.parametrize("name", ["qwen2-bias", "gpt2-layernorm"])
def test_training_fits_the_vocabulary_and_touches_only_the_recurrent_head(name, tmp_path, tiny_tokenizer):
    base = make_base(name, eos_token_id=None)
    otter = otter_hf.insert(base, num_recurrent_drafts=3, draft_vocab_size=DRAFT_VOCAB_SIZE)
    dataset, _ = self_distilled(base)
    original = {parameter_name: p.detach().clone() for parameter_name, p in otter.named_parameters()}
    trainer = OtterDraftTrainer(
        otter,
        draft_config(tmp_path, max_steps=30),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    assert otter.recurrent_draft_head.is_vocabulary_fitted()
    fitted = otter.recurrent_draft_head.draft_token_ids.clone()
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    # (The tiny GPT-2 repeats one token, which the fitted head drafts right from the start.)
    assert after["eval_recurrent_draft_accuracy_step_0"] >= before["eval_recurrent_draft_accuracy_step_0"]
    changed = {
        parameter_name for parameter_name, p in otter.named_parameters() if not torch.equal(p, original[parameter_name])
    }
    assert changed and all(parameter_name.startswith("recurrent_draft_head.") for parameter_name in changed)
    # A fitted vocabulary is kept when training goes on.
    OtterDraftTrainer(
        otter, draft_config(tmp_path, max_steps=1), train_dataset=dataset.select([0]), processing_class=tiny_tokenizer
    )
    assert torch.equal(otter.recurrent_draft_head.draft_token_ids, fitted)


@pytest.fixture(scope="module")
def trained_recurrent_otter(tmp_path_factory):
    """A tiny Qwen2 Otter model whose recurrent head was trained on the base's own greedy continuations."""
    base = make_base("qwen2-bias", eos_token_id=None)
    otter = otter_hf.insert(base, num_recurrent_drafts=3, draft_vocab_size=DRAFT_VOCAB_SIZE, draft_max_batch_size=4)
    dataset, sequences = self_distilled(base, num_prompts=8)
    config = draft_config(tmp_path_factory.mktemp("run"), max_steps=60)
    OtterDraftTrainer(otter, config, train_dataset=dataset, processing_class=make_tokenizer()).train()
    return base, otter.eval(), dataset, sequences


@pytest.mark.parametrize("batch_size", [1, 3])
def test_speculative_decoding_with_the_recurrent_head_is_greedy_on_the_base_computation(
    trained_recurrent_otter, batch_size
):
    base, otter, _, sequences = trained_recurrent_otter
    options = dict(do_sample=False, max_new_tokens=COMPLETION_LENGTH)
    random_prompts = random_batch(batch_size, 5, "left", seed=3)
    # The prompts the head was trained on, whose continuations it drafts well.
    trained_prompts = (sequences[:batch_size, :PROMPT_LENGTH], torch.ones_like(sequences[:batch_size, :PROMPT_LENGTH]))
    for input_ids, attention_mask in (random_prompts, trained_prompts):
        expected = base.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        output = otter.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            custom_generate=speculative_generate,
            draft_confidence_threshold=0.0,
            return_dict_in_generate=True,
            **options,
        )
        assert torch.equal(output.sequences, expected)
        # The head reads the original stream alone, so the inserted layers never ran: no inserted keys and values.
        assert len(output.past_key_values.layers) == base.config.num_hidden_layers
    assert max(output.accepted_tokens_per_step) > 1


def test_calibration_replays_decoding_with_the_recurrent_head(trained_recurrent_otter):
    _, otter, dataset, sequences = trained_recurrent_otter
    thresholds = [0.0, 0.5]
    calibration = calibrate_draft_confidence(otter, dataset, thresholds=thresholds)
    for index, threshold in enumerate(thresholds):
        steps = []
        for row in range(len(sequences)):
            prompt = sequences[row : row + 1, :PROMPT_LENGTH]
            output = otter.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                custom_generate=speculative_generate,
                draft_confidence_threshold=threshold,
                do_sample=False,
                max_new_tokens=COMPLETION_LENGTH,
                return_dict_in_generate=True,
            )
            assert torch.equal(output.sequences, sequences[row : row + 1])
            steps += output.accepted_tokens_per_step
        assert calibration.accepted_tokens_per_step[index] == pytest.approx(sum(steps) / len(steps))
    assert calibration.accepted_tokens_per_step[0] > 1


def test_the_fitted_vocabulary_is_saved_and_loaded(trained_recurrent_otter, tmp_path):
    base, otter, _, _ = trained_recurrent_otter
    otter.save_otter(tmp_path / "inserted")
    otter.save_pretrained(tmp_path / "full")
    for loaded in (otter_hf.load_otter(base, tmp_path / "inserted"), type(otter).from_pretrained(tmp_path / "full")):
        assert torch.equal(loaded.recurrent_draft_head.draft_token_ids, otter.recurrent_draft_head.draft_token_ids)
        assert torch.equal(loaded.recurrent_draft_head.lm_head.weight, otter.recurrent_draft_head.lm_head.weight)


def test_a_model_without_draft_heads_is_refused_by_the_trainer_and_the_decoder(tmp_path, tiny_tokenizer):
    otter = otter_hf.insert(make_base("llama-gqa-tied"))
    dataset = Dataset.from_dict({"text": ["i love this movie"]})
    with pytest.raises(ValueError, match="num_recurrent_drafts"):
        OtterDraftTrainer(otter, draft_config(tmp_path), train_dataset=dataset, processing_class=tiny_tokenizer)
    input_ids, attention_mask = random_batch(1, 4)
    with pytest.raises(ValueError, match="num_recurrent_drafts"):
        otter.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            custom_generate=speculative_generate,
            draft_confidence_threshold=0.0,
        )
