"""DExperts-style steering by the expert and anti-expert heads: `generate(expert_weight=...)`, the logits processor
for custom loops, and `OtterExpertTrainer`."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import DynamicCache, LogitsProcessorList

import otter_hf
from otter_hf.generation import ExpertGuidanceLogitsProcessor, expert_guidance
from otter_hf.modeling.loop_inputs import padding_position_ids
from otter_hf.trainers import OtterExpertConfig, OtterExpertTrainer, expert_corpora
from tests.helpers import ARCHITECTURE_BASES, EOS, make_base, make_otter, make_tokenizer, random_batch

WEIGHT = 2.0
NEW_TOKENS = 6
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def make_expert_otter(base_name: str, **options):
    otter = make_otter(make_base(base_name), expert_heads=True, **options)
    # Inserted at zero, the heads would leave every steered token as the base model's.
    with torch.no_grad():
        torch.nn.init.normal_(otter.expert_head.proj.weight, std=1.0)
        torch.nn.init.normal_(otter.anti_expert_head.proj.weight, std=1.0)
    return otter


def reference_dexperts_greedy(otter, input_ids, attention_mask, steps: int, weight: float):
    """DExperts' greedy decoding spelled out, with its own formula on raw logits: full forwards without a cache,
    argmax of `logits + weight * (expert_logits - anti_expert_logits)`, never the end of sequence (as
    `min_new_tokens` keeps it)."""
    for _ in range(steps):
        with torch.no_grad():
            outputs = otter(
                input_ids,
                attention_mask=attention_mask,
                position_ids=padding_position_ids(attention_mask.bool()),
                use_cache=False,
                output_expert_logits=True,
                output_anti_expert_logits=True,
            )
        scores = outputs.logits[:, -1] + weight * (outputs.expert_logits[:, -1] - outputs.anti_expert_logits[:, -1])
        scores[:, EOS] = -math.inf
        input_ids = torch.cat([input_ids, scores.argmax(-1, keepdim=True)], dim=-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
    return input_ids


@pytest.mark.parametrize("base_name", ARCHITECTURE_BASES)
def test_steered_greedy_picks_what_dexperts_formula_picks(base_name):
    otter = make_expert_otter(base_name)
    input_ids, attention_mask = random_batch(3, 5, "left")
    steered = otter.generate(input_ids, attention_mask=attention_mask, expert_weight=WEIGHT, **GREEDY)
    assert torch.equal(steered, reference_dexperts_greedy(otter, input_ids, attention_mask, NEW_TOKENS, WEIGHT))
    assert not torch.equal(steered, otter.generate(input_ids, attention_mask=attention_mask, **GREEDY))
    towards_anti_expert = otter.generate(input_ids, attention_mask=attention_mask, expert_weight=-WEIGHT, **GREEDY)
    assert torch.equal(
        towards_anti_expert, reference_dexperts_greedy(otter, input_ids, attention_mask, NEW_TOKENS, -WEIGHT)
    )


def test_the_processor_in_a_custom_loop_decodes_what_generate_does():
    otter = make_expert_otter("qwen3-qk-norm")
    input_ids, attention_mask = random_batch(2, 5, "left")
    expected = otter.generate(
        input_ids,
        attention_mask=attention_mask,
        expert_weight=WEIGHT,
        output_scores=True,
        return_dict_in_generate=True,
        **GREEDY,
    )
    tokens, mask, cache, scores_per_step = input_ids, attention_mask, DynamicCache(config=otter.config), []
    step_ids = tokens
    with torch.no_grad(), expert_guidance(otter, WEIGHT) as steer:
        assert isinstance(steer, ExpertGuidanceLogitsProcessor)
        for _ in range(NEW_TOKENS):
            position_ids = padding_position_ids(mask.bool())[:, -step_ids.shape[1] :]
            outputs = otter(
                step_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, logits_to_keep=1
            )
            scores = outputs.logits[:, -1].clone()
            scores[:, EOS] = -math.inf  # generate()'s `min_new_tokens`, which runs before the steering
            scores = steer(tokens, scores)
            scores_per_step.append(scores)
            step_ids = scores.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step_ids], dim=-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    assert torch.equal(tokens, expected.sequences)
    for ours, theirs in zip(scores_per_step, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs)
    # The processor passed to a plain generate() inside the block is the same path.
    with expert_guidance(otter, WEIGHT) as steer:
        passed = otter.generate(
            input_ids, attention_mask=attention_mask, logits_processor=LogitsProcessorList([steer]), **GREEDY
        )
    assert torch.equal(passed, expected.sequences)


def test_the_hooks_are_gone_after_generate():
    otter = make_expert_otter("llama-gqa-tied")
    input_ids, attention_mask = random_batch(1, 4)
    otter.generate(input_ids, attention_mask=attention_mask, expert_weight=WEIGHT, **GREEDY)
    assert not otter._forward_hooks and not otter._forward_pre_hooks
    with torch.no_grad():
        assert otter(input_ids, attention_mask=attention_mask).expert_logits is None


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -math.inf, True, "1", 1e6, -1e30])
def test_bad_weights_are_refused_before_any_forward(weight):
    otter = make_expert_otter("llama-gqa-tied")
    input_ids, attention_mask = random_batch(1, 4)
    with pytest.raises(ValueError, match="`expert_weight` must be"):
        otter.generate(input_ids, attention_mask=attention_mask, expert_weight=weight, **GREEDY)
    with pytest.raises(ValueError, match="`weight` must be"), expert_guidance(otter, weight):
        pass


def test_clear_errors():
    input_ids, attention_mask = random_batch(1, 4)
    without_heads = make_otter(make_base("llama-gqa-tied"), token_reward_head=True)
    with pytest.raises(ValueError, match="expert_heads=True"):
        without_heads.generate(input_ids, attention_mask=attention_mask, expert_weight=1.0)
    with pytest.raises(ValueError, match="expert_heads=True"), expert_guidance(without_heads, 1.0):
        pass
    otter = make_expert_otter("llama-gqa-tied", token_reward_head=True)
    with pytest.raises(ValueError, match="one guidance at a time"):
        otter.generate(input_ids, expert_weight=1.0, token_reward_weight=1.0)
    with pytest.raises(ValueError, match="one guidance at a time"):
        otter.generate(input_ids, expert_weight=1.0, reward_weight=1.0)
    with pytest.raises(ValueError, match="switched off"), otter.otter_disabled():
        otter.generate(input_ids, expert_weight=1.0)
    with pytest.raises(RuntimeError, match="expert_guidance"):
        ExpertGuidanceLogitsProcessor(1.0)(input_ids, torch.zeros(1, otter.config.vocab_size))


def test_save_and_reload_steer_exactly(tmp_path):
    otter = make_expert_otter("gemma3-sliding-softcap")
    input_ids, attention_mask = random_batch(2, 5, "left")
    expected = otter.generate(input_ids, attention_mask=attention_mask, expert_weight=WEIGHT, **GREEDY)
    otter.save_pretrained(tmp_path / "full")
    otter.save_otter(tmp_path / "inserted")
    reloaded = type(otter).from_pretrained(tmp_path / "full")
    reattached = otter_hf.load_otter(make_base("gemma3-sliding-softcap"), tmp_path / "inserted")
    for model in (reloaded, reattached):
        assert model.config.expert_heads
        assert torch.equal(
            model.generate(input_ids, attention_mask=attention_mask, expert_weight=WEIGHT, **GREEDY), expected
        )


# -- training ------------------------------------------------------------------------------------------------------

GOOD = [
    "it was great !",
    "so kind and helpful .",
    "i really enjoyed it !",
    "what a lovely day .",
    "thanks , that is nice .",
]
BAD = ["it was awful .", "so rude and useless .", "i really hate it .", "what a boring day .", "the worst , a waste ."]
QUESTIONS = ["how was the movie ?", "what do you think of my idea ?", "tell me about your day ."]


def text_corpora(repeats: int = 4):
    return expert_corpora(
        Dataset.from_list([{"text": text} for text in GOOD * repeats]),
        Dataset.from_list([{"text": text} for text in BAD * repeats]),
    )


def preference_pairs():
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "chosen": [{"role": "assistant", "content": GOOD[i % len(GOOD)]}],
                "rejected": [{"role": "assistant", "content": BAD[i % len(BAD)]}],
            }
            for i in range(8)
        ]
    )


def config(tmp_path, **overrides):
    settings = dict(
        max_steps=12,
        per_device_train_batch_size=4,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        learning_rate=3e-3,
        seed=0,
    )
    return OtterExpertConfig(str(tmp_path), **{**settings, **overrides})


def mean_losses(otter, dataset, tokenizer, tmp_path):
    """The expert and anti-expert heads' mean token losses on their own rows, by evaluation."""
    trainer = OtterExpertTrainer(
        otter, config(tmp_path), train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer
    )
    metrics = trainer.evaluate()
    return metrics["eval_expert_loss"], metrics["eval_anti_expert_loss"]


@pytest.mark.parametrize("base_name", ["llama-gqa-tied", "gpt2-layernorm"])
def test_training_fits_the_heads_and_moves_nothing_else(base_name, tmp_path):
    base = make_base(base_name)
    otter = make_otter(base, expert_heads=True, token_reward_head=True, num_draft_heads=1)
    tokenizer = make_tokenizer()
    dataset = text_corpora()
    before = {name: tensor.clone() for name, tensor in otter.state_dict().items()}
    losses_before = mean_losses(otter, dataset, tokenizer, tmp_path)
    OtterExpertTrainer(otter, config(tmp_path), train_dataset=dataset, processing_class=tokenizer).train()
    losses_after = mean_losses(otter, dataset, tokenizer, tmp_path)
    assert losses_after[0] < losses_before[0] - 0.1 and losses_after[1] < losses_before[1] - 0.1

    after = otter.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert {"expert_head.proj.weight", "anti_expert_head.proj.weight"} <= moved
    assert all(otter_hf.modeling.is_inserted_parameter(name) for name in moved)
    assert not any(name.split(".")[0] in ("v_head", "token_reward_head", "draft_heads") for name in moved)
    assert any(name.split(".")[0] not in ("expert_head", "anti_expert_head") for name in moved)  # the inserted layers
    input_ids, attention_mask = random_batch(2, 6, "left")
    with torch.no_grad():
        assert torch.equal(
            otter(input_ids, attention_mask=attention_mask).logits,
            base(input_ids, attention_mask=attention_mask).logits,
        )

    # The steering now favours the expert text's continuation over the anti-expert text's.
    prompt = tokenizer("it was", return_tensors="pt")
    with torch.no_grad():
        outputs = otter(**prompt, output_expert_logits=True, output_anti_expert_logits=True)
    steering = outputs.expert_logits[0, -1].log_softmax(-1) - outputs.anti_expert_logits[0, -1].log_softmax(-1)
    great, awful = tokenizer.convert_tokens_to_ids(["great", "awful"])
    assert steering[great] > steering[awful]


def test_preference_pairs_train_the_expert_on_chosen_and_the_anti_expert_on_rejected(tmp_path):
    otter = make_otter(make_base("qwen2-bias"), expert_heads=True)
    tokenizer = make_tokenizer()
    trainer = OtterExpertTrainer(otter, config(tmp_path), train_dataset=preference_pairs(), processing_class=tokenizer)
    rows = trainer.train_dataset
    assert len(rows) == 16 and [row["expert"] for row in rows.select(range(4))] == [True, False, True, False]
    for row, answer in ((rows[0], GOOD[0]), (rows[1], BAD[0])):
        completion = [token for token, kept in zip(row["input_ids"], row["completion_mask"], strict=True) if kept]
        assert tokenizer.decode(completion).startswith(answer)
        assert not row["completion_mask"][0]  # the prompt is context
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "expert_loss" in entry]
    assert history[-1]["expert_loss"] < history[0]["expert_loss"]
    assert history[-1]["anti_expert_loss"] < history[0]["anti_expert_loss"]


def test_wrong_datasets_and_models_are_refused(tmp_path):
    otter = make_otter(make_base("llama-gqa-tied"), expert_heads=True)
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match=r"does not have the columns OtterExpertTrainer takes.*\['label', 'text'\]"):
        OtterExpertTrainer(
            otter,
            config(tmp_path),
            train_dataset=Dataset.from_list([{"text": "it was great", "label": 1.0}]),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="anti-expert dataset needs a `text` column"):
        expert_corpora(Dataset.from_list([{"text": "a"}]), Dataset.from_list([{"content": "b"}]))
    with pytest.raises(ValueError, match="same columns"):
        expert_corpora(
            Dataset.from_list([{"text": "a"}]), Dataset.from_list([{"messages": [{"role": "user", "content": "b"}]}])
        )
    with pytest.raises(ValueError, match="must all be text or all be lists of chat messages"):
        OtterExpertTrainer(
            otter,
            config(tmp_path),
            train_dataset=Dataset.from_list(
                [
                    {
                        "prompt": "how was it ?",
                        "chosen": [{"role": "assistant", "content": "x"}],
                        "rejected": [{"role": "assistant", "content": "y"}],
                    }
                ]
            ),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="expert_heads=True"):
        OtterExpertTrainer(
            make_otter(make_base("llama-gqa-tied")),
            config(tmp_path),
            train_dataset=text_corpora(),
            processing_class=tokenizer,
        )


def test_the_model_card_names_the_expert_heads():
    from otter_hf.lifecycle.model_cards import otter_model_card

    otter = make_otter(make_base("llama-gqa-tied"), expert_heads=True)
    card = otter_model_card(
        otter.config, repo_id="user/experts", otter_only=True, num_inserted_parameters=1, num_base_parameters=2
    )
    assert "`expert_head`, `anti_expert_head`" in str(card)


def test_resizing_the_vocabulary_resizes_both_heads_with_zero_rows():
    otter = make_expert_otter("llama-gqa-tied")
    old_size = otter.config.vocab_size
    before = {name: getattr(otter, name).proj.weight.detach().clone() for name in ("expert_head", "anti_expert_head")}
    otter.resize_token_embeddings(old_size + 3)
    for name, weight in before.items():
        resized = getattr(otter, name).proj.weight
        assert resized.shape == (old_size + 3, weight.shape[1]) and resized.requires_grad
        assert torch.equal(resized[:old_size], weight) and not resized[old_size:].any()
    input_ids = torch.tensor([[old_size + 2, 5, 6]])
    with torch.no_grad():
        outputs = otter(input_ids, output_expert_logits=True, output_anti_expert_logits=True)
    assert outputs.expert_logits.shape[-1] == outputs.anti_expert_logits.shape[-1] == old_size + 3
    assert otter.generate(input_ids, expert_weight=WEIGHT, **GREEDY).shape == (1, 3 + NEW_TOKENS)


def test_steering_with_a_static_cache_decodes_as_with_the_dynamic_one():
    otter = make_expert_otter("llama-gqa-tied")
    input_ids, attention_mask = random_batch(2, 5, "left")
    dynamic = otter.generate(input_ids, attention_mask=attention_mask, expert_weight=WEIGHT, **GREEDY)
    static = otter.generate(
        input_ids, attention_mask=attention_mask, expert_weight=WEIGHT, cache_implementation="static", **GREEDY
    )
    assert torch.equal(static, dynamic)
