import pytest
import torch

import otter_hf
from otter_hf.generation import speculative_generate
from otter_hf.generation.speculative import otter_draft_heads

from conftest import PAD, make_base, make_otter, random_batch

MAX_NEW_TOKENS = 24


def greedy(base, input_ids, attention_mask, **kwargs):
    return base.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **kwargs)


def speculative(model, input_ids, attention_mask, **kwargs):
    options = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True)
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, custom_generate=speculative_generate, **{**options, **kwargs}
    )


# Bases whose caches can be cropped (sliding-window caches cannot): Gemma 3's sliding layer made global here.
DRAFTING_BASES = {
    "llama-gqa-tied": {},
    "llama-mha-untied": {},
    "qwen2-bias": {},
    "qwen3-qk-norm": {},
    "gemma3-sliding-softcap": {"layer_types": ["full_attention", "full_attention"]},
    "gpt2-layernorm": {},
}


def make_drafting_otter(name):
    """An Otter model whose draft heads hold small random weights (`make_otter` perturbs every inserted
    parameter): each head drafts roughly what the LM head predicts at its position, which is sometimes right.
    Its threshold verifies every draft."""
    base = make_base(name, **DRAFTING_BASES[name])
    return base, make_otter(base, num_draft_heads=4, draft_confidence_threshold=0.0)


class OracleDrafts:
    """Drafts the true greedy continuation (looked up in a reference output), optionally with one token corrupted."""

    def __init__(self, reference, num_drafts, corrupt_at=None):
        self.reference, self.num_drafts, self.corrupt_at = reference, num_drafts, corrupt_at

    def __call__(self, input_ids, hidden_states, inserted_hidden_states):
        length = input_ids.shape[1]
        drafts = self.reference[:, length : length + self.num_drafts].clone()
        if self.corrupt_at is not None and drafts.shape[1] > self.corrupt_at:
            drafts[:, self.corrupt_at] = (drafts[:, self.corrupt_at] + 1) % 96
        return drafts


@pytest.mark.parametrize("name", sorted(DRAFTING_BASES))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_output_is_token_identical_with_random_draft_heads(name, batch_size):
    base, model = make_drafting_otter(name)
    input_ids, attention_mask = random_batch(batch_size, 7, padding="left" if batch_size > 1 else None, seed=batch_size)
    reference = greedy(base, input_ids, attention_mask)
    output = speculative(model, input_ids, attention_mask)
    assert torch.equal(output.sequences, reference)
    steps = output.accepted_tokens_per_step
    assert sum(steps) == MAX_NEW_TOKENS and all(1 <= step <= 5 for step in steps)


def test_random_draft_heads_are_sometimes_accepted_and_sometimes_not():
    accepted = []
    for name in ("llama-gqa-tied", "llama-mha-untied"):
        _, model = make_drafting_otter(name)
        input_ids, attention_mask = random_batch(3, 7, padding="left")
        accepted += speculative(model, input_ids, attention_mask).accepted_tokens_per_step
    assert min(accepted) == 1 and max(accepted) > 1


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-bias", "qwen3-qk-norm", "gemma3-sliding-softcap", "gpt2-layernorm"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_right_drafts_are_all_accepted_and_keep_the_cache_consistent(name, batch_size):
    base, model = make_drafting_otter(name)
    input_ids, attention_mask = random_batch(batch_size, 6, padding="left" if batch_size > 1 else None)
    reference = greedy(base, input_ids, attention_mask)
    output = speculative(model, input_ids, attention_mask, draft_fn=OracleDrafts(reference, 4))
    assert torch.equal(output.sequences, reference)
    assert output.accepted_tokens_per_step == [5] * (MAX_NEW_TOKENS // 5) + [MAX_NEW_TOKENS % 5]
    # The cache holds exactly the accepted tokens, original and inserted layers alike.
    cache_lengths = {layer.keys.shape[-2] for layer in output.past_key_values.layers}
    assert len(output.past_key_values.layers) == 2 * model.config.num_hidden_layers
    assert cache_lengths == {reference.shape[1]}


def test_a_wrong_draft_rejects_itself_and_every_draft_after_it():
    base, model = make_drafting_otter("llama-mha-untied")
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    reference = greedy(base, input_ids, attention_mask)
    output = speculative(model, input_ids, attention_mask, draft_fn=OracleDrafts(reference, 4, corrupt_at=2))
    assert torch.equal(output.sequences, reference)
    # t1 and the two drafts before the corrupted one, every step.
    assert output.accepted_tokens_per_step == [3] * (MAX_NEW_TOKENS // 3)


def test_rows_finishing_at_eos_are_padded_like_greedy_search():
    base, model = make_drafting_otter("llama-mha-untied")
    input_ids, attention_mask = random_batch(3, 7, padding="left", seed=5)
    free_running = greedy(base, input_ids, attention_mask)
    # Make the middle row's fourth new token an end of sequence, so that row stops early while the others go on.
    eos_token = int(free_running[1, input_ids.shape[1] + 3])
    reference = greedy(base, input_ids, attention_mask, eos_token_id=eos_token, pad_token_id=PAD)
    assert (reference[1, input_ids.shape[1] + 4 :] == PAD).all()
    output = speculative(model, input_ids, attention_mask, eos_token_id=eos_token, pad_token_id=PAD)
    assert torch.equal(output.sequences, reference)


def test_logits_processors_and_scores_match_greedy_search():
    base, model = make_drafting_otter("qwen2-bias")
    input_ids, attention_mask = random_batch(2, 7, padding="left", seed=3)
    options = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, output_scores=True)
    reference = greedy(base, input_ids, attention_mask, return_dict_in_generate=True, **options)
    assert not torch.equal(reference.sequences, greedy(base, input_ids, attention_mask))  # the processors matter
    output = speculative(model, input_ids, attention_mask, **options)
    assert torch.equal(output.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(output.scores), torch.stack(reference.scores))


def test_a_plain_causal_lm_decodes_speculatively_with_a_draft_fn():
    base = make_base("llama-gqa-tied")
    input_ids, attention_mask = random_batch(1, 6)
    reference = greedy(base, input_ids, attention_mask)
    output = speculative(base, input_ids, attention_mask, draft_fn=OracleDrafts(reference, 3))
    assert torch.equal(output.sequences, reference)
    assert max(output.accepted_tokens_per_step) == 4


def test_draft_heads_predict_from_both_final_streams():
    _, model = make_drafting_otter("llama-gqa-tied")
    input_ids, _ = random_batch(2, 5)
    outputs = model(input_ids=input_ids, output_hidden_states=True, output_draft_logits=True)
    draft_logits = otter_draft_heads(model)(input_ids, outputs.hidden_states[-1][:, -1], outputs.inserted_hidden_states[-1][:, -1])
    torch.testing.assert_close(draft_logits, outputs.draft_logits[:, -1])


def test_refuses_models_that_cannot_draft_or_crop():
    input_ids, attention_mask = random_batch(1, 5)
    with pytest.raises(TypeError, match="num_draft_heads"):
        speculative(make_base("llama-gqa-tied"), input_ids, attention_mask)
    without_heads = make_otter(make_base("llama-gqa-tied"))
    with pytest.raises(ValueError, match="no draft heads"):
        speculative(without_heads, input_ids, attention_mask)
    sliding = otter_hf.insert(make_base("mistral-sliding"), num_draft_heads=2)
    with pytest.raises(ValueError, match="sliding-window"):
        speculative(sliding, input_ids, attention_mask)
    _, model = make_drafting_otter("llama-gqa-tied")
    with pytest.raises(ValueError, match="num_beams=1"):
        speculative(model, input_ids, attention_mask, num_beams=2)
    with model.otter_disabled(), pytest.raises(ValueError, match="switched off"):
        speculative(model, input_ids, attention_mask)


def test_stops_at_max_length_without_drafting_past_it():
    base, model = make_drafting_otter("llama-gqa-tied")
    input_ids, attention_mask = random_batch(1, 6)
    reference = base.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=3)
    seen = []

    def record(ids, hidden, inserted):
        seen.append(ids.shape[1])
        return OracleDrafts(reference, 4)(ids, hidden, inserted)

    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=3,
        custom_generate=speculative_generate,
        draft_fn=record,
        return_dict_in_generate=True,
    )
    assert torch.equal(output.sequences, reference)
    assert output.accepted_tokens_per_step == [3]
    assert seen == [input_ids.shape[1] + 1]
    assert all(layer.keys.shape[-2] == reference.shape[1] for layer in output.past_key_values.layers)


# -- the draft confidence threshold -----------------------------------------------------------------------------


def confident_logits(tokens, confidences, vocab_size=96):
    """Draft logits whose argmax is `tokens` (batch, num_drafts) with softmax probability `confidences`."""
    confidences = torch.as_tensor(confidences, dtype=torch.float32).expand(tokens.shape)
    rest = ((1 - confidences) / (vocab_size - 1)).log()
    logits = rest[..., None].expand(*tokens.shape, vocab_size).clone()
    return logits.scatter(-1, tokens[..., None], confidences.log()[..., None])


class ConfidentOracle(OracleDrafts):
    """The true greedy continuation as draft logits, with the given confidence for each draft (and row)."""

    def __init__(self, reference, confidences):
        super().__init__(reference, len(confidences[0]))
        self.confidences = torch.tensor(confidences)

    def __call__(self, input_ids, hidden_states, inserted_hidden_states):
        drafts = super().__call__(input_ids, hidden_states, inserted_hidden_states)
        return confident_logits(drafts, self.confidences[:, : drafts.shape[1]])


def steps_of(tokens_per_step):
    """The tokens each step adds to MAX_NEW_TOKENS when every step adds `tokens_per_step`, the last one what is left."""
    remainder = [MAX_NEW_TOKENS % tokens_per_step] if MAX_NEW_TOKENS % tokens_per_step else []
    return [tokens_per_step] * (MAX_NEW_TOKENS // tokens_per_step) + remainder


def test_the_threshold_cuts_each_chain_before_its_first_unconfident_draft():
    base = make_base("llama-gqa-tied")
    input_ids, attention_mask = random_batch(1, 6)
    reference = greedy(base, input_ids, attention_mask)
    oracle = ConfidentOracle(reference, [[0.9, 0.8, 0.3, 0.9]])
    for threshold, tokens_per_step in ((0.0, 5), (0.25, 5), (0.5, 3), (0.85, 2), (0.95, 1)):
        output = speculative(base, input_ids, attention_mask, draft_fn=oracle, draft_confidence_threshold=threshold)
        assert torch.equal(output.sequences, reference)
        assert output.accepted_tokens_per_step == steps_of(tokens_per_step)


def test_the_shortest_confident_chain_of_a_batch_sets_its_length():
    base = make_base("llama-gqa-tied")
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    reference = greedy(base, input_ids, attention_mask)
    oracle = ConfidentOracle(reference, [[0.9, 0.9, 0.9, 0.9], [0.9, 0.9, 0.2, 0.9]])
    output = speculative(base, input_ids, attention_mask, draft_fn=oracle, draft_confidence_threshold=0.5)
    assert torch.equal(output.sequences, reference)
    assert output.accepted_tokens_per_step == steps_of(3)


def test_threshold_zero_verifies_every_draft_of_the_draft_heads():
    _, model = make_drafting_otter("llama-gqa-tied")
    input_ids, attention_mask = random_batch(3, 7, padding="left")
    heads = otter_draft_heads(model)
    # Token ids carry no confidence, so every one is verified: the drafting before the threshold existed.
    every_draft = speculative(model, input_ids, attention_mask, draft_fn=lambda *streams: heads(*streams).argmax(-1))
    for options in ({}, {"draft_confidence_threshold": 0.0}):  # the config's 0.0, then the argument
        output = speculative(model, input_ids, attention_mask, **options)
        assert torch.equal(output.sequences, every_draft.sequences)
        assert output.accepted_tokens_per_step == every_draft.accepted_tokens_per_step
    assert max(every_draft.accepted_tokens_per_step) > 1


def test_untrained_draft_heads_decode_as_plain_greedy_on_the_base_computation():
    base = make_base("llama-gqa-tied")
    model = otter_hf.insert(base, num_draft_heads=4)  # zero-initialised heads, threshold 1.0 by default
    assert model.config.draft_confidence_threshold == 1.0
    input_ids, attention_mask = random_batch(2, 7, padding="left")
    output = speculative(model, input_ids, attention_mask)
    assert torch.equal(output.sequences, greedy(base, input_ids, attention_mask))
    assert output.accepted_tokens_per_step == [1] * MAX_NEW_TOKENS
    # Under `otter_disabled()`: only the original layers were cached, the inserted stream never ran.
    assert len(output.past_key_values.layers) == model.config.num_hidden_layers


def test_threshold_one_never_calls_the_draft_fn():
    base = make_base("qwen2-bias")
    input_ids, attention_mask = random_batch(1, 6)

    def refuse(*streams):
        raise AssertionError("drafted with drafting switched off")

    output = speculative(base, input_ids, attention_mask, draft_fn=refuse, draft_confidence_threshold=1.0)
    assert torch.equal(output.sequences, greedy(base, input_ids, attention_mask))


def test_the_threshold_must_be_a_probability():
    _, model = make_drafting_otter("llama-gqa-tied")
    input_ids, attention_mask = random_batch(1, 5)
    for threshold in (1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"`draft_confidence_threshold` must be a number in \[0, 1\]"):
            speculative(model, input_ids, attention_mask, draft_confidence_threshold=threshold)
    with pytest.raises(ValueError, match=r"`draft_confidence_threshold` must be in \[0, 1\], got 2.0"):
        otter_hf.insert(make_base("llama-gqa-tied"), num_draft_heads=2, draft_confidence_threshold=2.0)


def test_the_configured_threshold_is_saved_loaded_and_used(tmp_path):
    base, model = make_drafting_otter("llama-gqa-tied")
    model.config.draft_confidence_threshold = 0.37
    model.save_pretrained(tmp_path / "full")
    model.save_otter(tmp_path / "inserted")
    for loaded in (type(model).from_pretrained(tmp_path / "full"), otter_hf.load_otter(base, tmp_path / "inserted")):
        assert loaded.config.draft_confidence_threshold == 0.37
    input_ids, attention_mask = random_batch(3, 7, padding="left")
    model.config.draft_confidence_threshold = 0.0
    assert max(speculative(model, input_ids, attention_mask).accepted_tokens_per_step) > 1
    model.config.draft_confidence_threshold = 1.0
    assert speculative(model, input_ids, attention_mask).accepted_tokens_per_step == [1] * MAX_NEW_TOKENS
