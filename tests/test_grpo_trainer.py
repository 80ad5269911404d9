"""OtterGRPOTrainer: the Otter reward read from the policy's own frozen base, in TRL's GRPO loop."""

import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from otter_hf import sequence_classification_view
from otter_hf.trainers import OtterGRPOConfig, OtterGRPOTrainer
from otter_hf.trainers.grpo_trainer import turn_closing_ids
from tests.helpers import make_base, make_otter, make_tokenizer

PROMPTS = ["how was the movie ?", "how was the food ?", "tell me about your day .", "what do you think of my idea ?"]
BASE = "llama-gqa-tied"


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def config(tmp_path, **options) -> OtterGRPOConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-2,
        beta=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return OtterGRPOConfig(**{**defaults, **options})


def prompts() -> Dataset:
    return Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS])


def trainer_for(tmp_path, model=None, **options) -> OtterGRPOTrainer:
    peft_config = options.pop("peft_config", lora())
    reward_funcs = options.pop("reward_funcs", None)
    return OtterGRPOTrainer(
        model=model if model is not None else make_otter(make_base(BASE)),
        reward_funcs=reward_funcs,
        args=config(tmp_path, **options),
        train_dataset=prompts(),
        processing_class=make_tokenizer(),
        peft_config=peft_config,
    )


class Recorder:
    """Keeps what `_generate_and_score_completions` hands the loss, and the rewards the Otter reward gave."""

    def __init__(self, trainer):
        self.batches, self.rewards, self.separate_reward_forwards = [], [], 0
        generate_and_score, otter_rewards = trainer._generate_and_score_completions, trainer._otter_rewards
        otter_values = trainer.otter_values

        def record_batch(inputs):
            batch = generate_and_score(inputs)
            self.batches.append(batch)
            return batch

        def record_rewards(count):
            rewards = otter_rewards(count)
            self.rewards.append(rewards)
            return rewards

        def count_separate_forwards(*args):
            self.separate_reward_forwards += 1
            return otter_values(*args)

        trainer._generate_and_score_completions = record_batch
        trainer._otter_rewards = record_rewards
        trainer.otter_values = count_separate_forwards


def full_sequences(batch):
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask


@pytest.mark.parametrize("beta", [0.1, 0.0])
def test_reward_equals_the_sequence_classification_view_on_the_same_completions(tmp_path, beta):
    otter = make_otter(make_base(BASE))
    reference = make_otter(make_base(BASE))  # an untouched copy: same weights, never trained
    trainer = trainer_for(tmp_path, otter, beta=beta, max_steps=1)
    recorder = Recorder(trainer)
    trainer.train()
    (batch,), (rewards,) = recorder.batches, recorder.rewards
    input_ids, attention_mask = full_sequences(batch)
    with torch.no_grad():
        expected = sequence_classification_view(reference)(input_ids, attention_mask=attention_mask).logits[:, 0]
    torch.testing.assert_close(torch.tensor(rewards), expected, rtol=1e-5, atol=1e-6)
    assert len(set(rewards)) > 1  # differing completions, differing rewards
    # With beta > 0 the reward came out of the reference forward; with beta == 0 out of one forward of its own.
    assert recorder.separate_reward_forwards == (0 if beta > 0 else 1)
    logged = next(log for log in trainer.state.log_history if "rewards/otter_value/mean" in log)
    assert logged["rewards/otter_value/mean"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-5)


def test_reference_log_probabilities_are_the_base_models(tmp_path):
    base = make_base(BASE)
    trainer = trainer_for(tmp_path, beta=0.1, max_steps=2)
    recorder = Recorder(trainer)
    trainer.train()
    assert len(recorder.batches) == 2
    for batch in recorder.batches:  # the second after one update of the adapter: still the base's
        input_ids, attention_mask = full_sequences(batch)
        with torch.no_grad():
            logits = base(input_ids, attention_mask=attention_mask).logits[:, :-1]
        completion_length = batch["completion_ids"].shape[1]
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        expected = log_probs[:, -completion_length:] * batch["completion_mask"]
        actual = batch["ref_per_token_logps"] * batch["completion_mask"]
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_rl_steps_train_the_adapter_and_leave_the_inserted_parameters_and_base(tmp_path):
    otter = make_otter(make_base(BASE))
    before = {name: tensor.clone() for name, tensor in otter.state_dict().items()}
    trainer = trainer_for(tmp_path, otter, max_steps=3)
    trainer.train()
    after = trainer.accelerator.unwrap_model(trainer.model).get_base_model().state_dict()
    lora_changed = [name for name in after if "lora_B" in name and after[name].abs().sum() > 0]
    assert lora_changed  # LoRA's B starts at zero: a non-zero one was trained
    frozen = {name.replace(".base_layer", ""): tensor for name, tensor in after.items() if "lora_" not in name}
    assert frozen.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], frozen[name])]
    assert changed == []


def test_checkpoints_hold_the_adapter_only(tmp_path):
    otter = make_otter(make_base(BASE))
    trainer = trainer_for(tmp_path, otter, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    weights = load_file(checkpoint / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    saved = sorted(os.listdir(checkpoint))
    assert not any(
        name.startswith(("model", "otter_model")) or name.endswith((".bin", ".pt", ".pth")) for name in saved
    )
    trainer.save_model(str(tmp_path / "final"))
    final = sorted(os.listdir(tmp_path / "final"))
    assert "adapter_model.safetensors" in final
    assert not any(name.startswith(("model", "otter_model")) or name.endswith((".bin", ".pt")) for name in final)


def test_other_reward_functions_combine_with_reward_weights(tmp_path):
    def length(completions, **_):
        return [float(len(completion)) for completion in completions]

    trainer = trainer_for(tmp_path, reward_funcs=length, reward_weights=[2.0, 0.5], max_steps=1)
    recorder = Recorder(trainer)
    trainer.train()
    logged = next(log for log in trainer.state.log_history if "reward" in log)
    (rewards,) = recorder.rewards
    assert "rewards/length/mean" in logged
    expected = 2.0 * logged["rewards/otter_value/mean"] + 0.5 * logged["rewards/length/mean"]
    assert logged["reward"] == pytest.approx(expected, rel=1e-5)
    assert len(rewards) == 4


def test_policy_without_an_adapter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="PEFT adapter.*sequence_classification_view"):
        trainer_for(tmp_path, peft_config=None)


@pytest.mark.parametrize(
    "target_modules", [["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"], ids=["base-names", "all-linear"]
)
def test_the_adapter_leaves_the_inserted_modules_alone(tmp_path, target_modules):
    # The inserted attention has an `o_proj` of its own, and "all-linear" names every linear module.
    trainer = trainer_for(tmp_path, peft_config=LoraConfig(r=4, target_modules=target_modules), max_steps=1)
    adapted = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in name and "inserted_" not in name for name in adapted)
    assert any(".self_attn.o_proj." in name for name in adapted)


def test_an_adapter_training_inserted_parameters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="inserted parameters.*must stay frozen"):
        trainer_for(tmp_path, peft_config=LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["v_head"]))
    wrapped = get_peft_model(make_otter(make_base(BASE)), LoraConfig(r=4, target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="inserted parameters.*must stay frozen"):
        trainer_for(tmp_path, wrapped, peft_config=None)


def test_a_pre_wrapped_peft_model_trains(tmp_path):
    policy = get_peft_model(make_otter(make_base(BASE)), lora())
    trainer = trainer_for(tmp_path, policy, peft_config=None, max_steps=1)
    recorder = Recorder(trainer)
    trainer.train()
    assert len(recorder.rewards) == 1


def test_a_base_that_is_not_an_otter_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="Otter model"):
        trainer_for(tmp_path, make_base(BASE))


def test_reward_checkpoint_of_another_base_is_refused(tmp_path):
    make_otter(make_base(BASE, seed=0)).save_otter(tmp_path / "reward")
    other_base = make_base(BASE, seed=5)  # same sizes, other weights
    with pytest.raises(ValueError, match="fingerprint|weights"):
        trainer_for(tmp_path, other_base, otter_reward_path=str(tmp_path / "reward"))


def test_reward_checkpoint_attached_to_its_own_base_trains(tmp_path):
    make_otter(make_base(BASE, seed=0)).save_otter(tmp_path / "reward")
    trainer = trainer_for(tmp_path, make_base(BASE, seed=0), otter_reward_path=str(tmp_path / "reward"), max_steps=1)
    recorder = Recorder(trainer)
    trainer.train()
    assert len(recorder.rewards[0]) == 4


def test_tokenizer_of_another_model_is_refused(tmp_path):
    otter = make_otter(make_base(BASE))
    otter.save_pretrained(tmp_path / "otter")
    saved = make_tokenizer()
    saved.save_pretrained(tmp_path / "otter")
    other = make_tokenizer()
    other.add_tokens(["zebra"])  # one more word: another vocabulary
    with pytest.raises(ValueError, match="tokenizer.*differs"):
        OtterGRPOTrainer(
            model=str(tmp_path / "otter"),
            args=config(tmp_path),
            train_dataset=prompts(),
            processing_class=other,
            peft_config=lora(),
        )


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([f"word{index}" for index in range(40)])
    with pytest.raises(ValueError, match="not the tokenizer of this model"):
        OtterGRPOTrainer(
            model=make_otter(make_base(BASE)),
            args=config(tmp_path),
            train_dataset=prompts(),
            processing_class=tokenizer,
            peft_config=lora(),
        )


@pytest.mark.parametrize("beta", [0.1, 0.0])
def test_the_inserted_stream_runs_only_to_read_the_reward(tmp_path, beta):
    otter = make_otter(make_base(BASE))
    trainer = trainer_for(tmp_path, otter, beta=beta, max_steps=2)
    forwards = {"with the inserted stream": 0, "base alone": 0}

    def count(backbone, inputs):
        forwards["with the inserted stream" if backbone.otter_enabled else "base alone"] += 1

    otter.base_model.register_forward_pre_hook(count)
    trainer.train()
    # One scoring forward per step (the 4 completions fit one batch): the reference's when beta > 0, the reward's own
    # otherwise; generation (one forward per token) and the training forward run the base alone.
    assert forwards["with the inserted stream"] == 2
    assert forwards["base alone"] > 2 * 2


def conversational_prompts() -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": prompt}]} for prompt in PROMPTS])


def words_only(tokenizer) -> dict:
    """Generation settings that keep completions to words and the end of turn: TRL's reward models decode the
    completion and tokenize the text again, which drops other special tokens and ids the tokenizer lacks. The end
    of turn is made likelier, so that some completions end with it and others are cut off by the length limit."""
    others = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    others |= set(range(len(tokenizer), make_base(BASE).config.vocab_size))
    return {"suppress_tokens": sorted(others), "sequence_bias": [[[tokenizer.eos_token_id], 3.0]]}


def test_turn_closing_ids_are_what_the_template_writes_after_an_answer():
    tokenizer = make_tokenizer()
    prompt = [{"role": "user", "content": PROMPTS[0]}]
    assert turn_closing_ids(tokenizer, prompt) == [tokenizer.eos_token_id]


@pytest.mark.parametrize("beta", [0.1, 0.0])
def test_conversational_reward_equals_trls_reward_model_on_the_closed_turn(tmp_path, beta):
    """With conversational prompts TRL's reward models score each completion as a closed assistant turn; the Otter
    reward scores the same tokens, whether or not the completion generated the end of turn itself."""
    tokenizer = make_tokenizer()
    otter = make_otter(make_base(BASE))
    reference = sequence_classification_view(make_otter(make_base(BASE))).eval()
    scored_by_trl = []
    reference.register_forward_hook(lambda module, inputs, output: scored_by_trl.append(output.logits[:, 0]))
    trainer = OtterGRPOTrainer(
        model=otter,
        reward_funcs=reference,
        reward_processing_classes=[None, tokenizer],
        args=config(tmp_path, beta=beta, max_steps=1, generation_kwargs=words_only(tokenizer)),
        train_dataset=conversational_prompts(),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    recorder = Recorder(trainer)
    trainer.train()
    (batch,), (rewards,) = recorder.batches, recorder.rewards
    (expected,) = scored_by_trl
    torch.testing.assert_close(torch.tensor(rewards), expected.float(), rtol=1e-5, atol=1e-6)
    assert len(set(rewards)) > 1
    assert recorder.separate_reward_forwards == (0 if beta > 0 else 1)
    # Both kinds of completion were scored: cut off by the length limit (closed by the reward) and ended by the model.
    ended = (batch["completion_ids"] == tokenizer.eos_token_id).any(dim=1)
    assert ended.any() and not ended.all(), batch["completion_ids"]
