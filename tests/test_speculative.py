from collections import Counter

import pytest
import torch
import transformers
from datasets import Dataset
from packaging import version
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import otter_hf
from otter_hf.generation import calibrate_draft_confidence, speculative_generate
from otter_hf.generation.speculative import otter_draft_heads
from otter_hf.modeling.inserted_stream import otter_cache_layers
from tests.helpers import ARCHITECTURE_BASES, BASE_MODELS, EOS, PAD, make_base, make_otter, random_batch

MAX_NEW_TOKENS = 24


def greedy(base, input_ids, attention_mask, **kwargs):
    """Plain `generate()`: greedy search unless `kwargs` say otherwise."""
    options = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return base.generate(input_ids=input_ids, attention_mask=attention_mask, **{**options, **kwargs})


def speculative(model, input_ids, attention_mask, **kwargs):
    options = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True)
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        custom_generate=speculative_generate,
        **{**options, **kwargs},
    )


# Bases whose caches can be cropped (sliding-window caches cannot): Mistral's window applies to every layer, the
# sliding layers of the others (Gemma 3, OLMo 3) and Llama 4's chunked ones (cached as sliding) are made global here.
# Sizes that keep these tiny models' greedy continuations clear of the end-of-sequence token for MAX_NEW_TOKENS.
CONTINUING_SIZES = {
    "glm4moe-dense-shared": {"intermediate_size": 64},
    "qwen3next-linear-full-sparse-dense": {"intermediate_size": 64},
}


def _global_attention(sizes: dict) -> dict:
    if "layer_types" in sizes:
        return {"layer_types": ["full_attention"] * len(sizes["layer_types"])}
    return {"attention_chunk_size": None} if "attention_chunk_size" in sizes else {}


# transformers 5.19's Llama 4 builds chunked masks in every layer, needing `attention_chunk_size`, while caches of
# chunked layers cannot be cropped: its base cannot decode speculatively there.
BASES_WITHOUT_CROPPABLE_CACHE = ("llama4",) if version.parse(transformers.__version__) < version.parse("5.20") else ()

DRAFTING_BASES = {
    name: {**_global_attention(sizes), **CONTINUING_SIZES.get(name, {})}
    for name, (_, _, sizes) in BASE_MODELS.items()
    if name != "mistral-sliding" and not name.startswith(BASES_WITHOUT_CROPPABLE_CACHE)
}


def make_drafting_otter(name):
    """An Otter model whose draft heads hold small random weights (`make_otter` perturbs every inserted
    parameter): each head drafts roughly what the LM head predicts at its position, which is sometimes right.
    Its threshold verifies every draft, at batch sizes up to 8."""
    base = make_base(name, **DRAFTING_BASES[name])
    return base, make_otter(base, num_draft_heads=4, draft_confidence_threshold=0.0, draft_max_batch_size=8)


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


@pytest.mark.parametrize("name", [name for name in ARCHITECTURE_BASES if name in DRAFTING_BASES])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_right_drafts_are_all_accepted_and_keep_the_cache_consistent(name, batch_size):
    base, model = make_drafting_otter(name)
    input_ids, attention_mask = random_batch(batch_size, 6, padding="left" if batch_size > 1 else None)
    reference = greedy(base, input_ids, attention_mask)
    # A row that ends early is padded, and the oracle's drafts after its end are padding: pick a test config whose
    # greedy continuations run to MAX_NEW_TOKENS.
    assert not (reference[:, input_ids.shape[1] :] == EOS).any(), f"{name}'s greedy continuation ends early"
    output = speculative(model, input_ids, attention_mask, draft_fn=OracleDrafts(reference, 4))
    assert torch.equal(output.sequences, reference)
    assert output.accepted_tokens_per_step == [5] * (MAX_NEW_TOKENS // 5) + [MAX_NEW_TOKENS % 5]
    # The cache holds exactly the accepted tokens, original and inserted layers alike.
    cache_lengths = {layer.keys.shape[-2] for layer in output.past_key_values.layers if layer.keys is not None}
    assert len(output.past_key_values.layers) == otter_cache_layers(model.config)
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
    draft_logits = otter_draft_heads(model)(
        input_ids, outputs.hidden_states[-1][:, -1], outputs.inserted_hidden_states[-1][:, -1]
    )
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


def test_the_model_drafts_only_for_batches_up_to_its_draft_max_batch_size():
    base, model = make_drafting_otter("llama-gqa-tied")
    model.config.draft_max_batch_size = 2
    for batch_size, drafts in ((1, True), (2, True), (3, False)):
        input_ids, attention_mask = random_batch(batch_size, 7, padding="left" if batch_size > 1 else None)
        output = speculative(model, input_ids, attention_mask)
        assert torch.equal(output.sequences, greedy(base, input_ids, attention_mask))
        assert (max(output.accepted_tokens_per_step) > 1) == drafts
        # Drafting off runs the base computation alone: no inserted keys and values were cached.
        assert (len(output.past_key_values.layers) == model.config.num_hidden_layers) == (not drafts)
    with pytest.raises(ValueError, match="`draft_max_batch_size` must be an integer from 1 to 4096, got 0"):
        otter_hf.insert(base, num_draft_heads=2, draft_max_batch_size=0)


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


# -- calibration ----------------------------------------------------------------------------------------------

PROMPT_LENGTH, COMPLETION_LENGTH = 6, 16
# A base whose greedy continuations do not just repeat one token (as the tied tiny Llama's do), which untrained
# heads, drafting the next token once more, would get right.
CALIBRATION_BASE = "qwen2-bias"


def self_distilled(base, num_prompts=4):
    """Random prompts and the base's greedy continuations (the base has no end-of-sequence token, so every
    continuation is full length), as `build_self_distillation_dataset` writes them, and as one tensor."""
    input_ids, attention_mask = random_batch(num_prompts, PROMPT_LENGTH, seed=7)
    sequences = base.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=COMPLETION_LENGTH
    )
    completion_mask = [[0] * PROMPT_LENGTH + [1] * COMPLETION_LENGTH] * num_prompts
    return Dataset.from_dict({"input_ids": sequences.tolist(), "completion_mask": completion_mask}), sequences


class LookUpDrafts:
    """Draft logits from the self-distilled sequences: head 0 right, with confidence 0.85; the later heads wrong,
    with confidence 0.35."""

    def __init__(self, sequences, num_drafts=4):
        self.sequences, self.num_drafts = sequences, num_drafts

    def __call__(self, input_ids, hidden_states, inserted_hidden_states):
        length = input_ids.shape[1]
        row = int((self.sequences[:, :length] == input_ids).all(-1).nonzero()[0])
        drafts = self.sequences[row, length : length + self.num_drafts]
        drafts = torch.cat([drafts, drafts.new_full((self.num_drafts - len(drafts),), 3)])
        drafts[1:] = (drafts[1:] + 1) % 96
        return confident_logits(drafts[None], [0.85] + [0.35] * (self.num_drafts - 1))


def test_calibration_never_drafts_with_untrained_heads():
    base = make_base(CALIBRATION_BASE, eos_token_id=None)
    dataset, _ = self_distilled(base)
    calibration = calibrate_draft_confidence(otter_hf.insert(base, num_draft_heads=4), dataset)
    assert calibration.threshold == 1.0 and calibration.expected_speed_up == 1.0
    assert max(calibration.speed_ups) < 1.0
    assert len(calibration.speed_ups) == len(calibration.thresholds) == 100


def test_calibration_keeps_the_drafts_that_pay():
    base = make_base(CALIBRATION_BASE, eos_token_id=None)
    dataset, sequences = self_distilled(base)
    linear_costs = dict(verification_cost=0.2, drafting_overhead=0.3, verification_fixed_cost=0.0)
    calibration = calibrate_draft_confidence(base, dataset, draft_fn=LookUpDrafts(sequences), **linear_costs)
    # Only head 0 is worth verifying: cut after it, anywhere in [0.35, 0.85); the highest such threshold wins ties.
    assert calibration.threshold == 0.84
    best = calibration.thresholds.index(0.84)
    assert calibration.drafts_per_step[best] <= 1.0 and calibration.accepted_tokens_per_step[best] > 1.9
    # Every step gains a token at a cost of 1 + 0.3 + 0.2, but a row's last one.
    assert 1.25 < calibration.expected_speed_up <= 2 / 1.5 + 1e-9
    # Verifying all four drafts costs more than it gains.
    assert calibration.speed_ups[0] < 1.0 and calibration.drafts_per_step[0] > 3
    # Head 0's drafts are accepted (bar the padding past a row's end), the others' never.
    head_zero_bin, later_heads_bin = calibration.acceptance_by_confidence[8], calibration.acceptance_by_confidence[3]
    assert head_zero_bin[1] > 0.9 and later_heads_bin[1] == 0.0 and later_heads_bin[2] > 0
    # Without costs, every threshold that verifies head 0 gains as much: the highest wins.
    free = calibrate_draft_confidence(
        base,
        dataset,
        draft_fn=LookUpDrafts(sequences),
        verification_cost=0,
        drafting_overhead=0,
        verification_fixed_cost=0,
    )
    assert free.threshold == 0.84 and free.speed_ups[0] == free.expected_speed_up


def test_the_fixed_cost_of_a_verification_forward_prices_short_chains():
    base = make_base(CALIBRATION_BASE, eos_token_id=None)
    dataset, sequences = self_distilled(base)
    # By default (CPU costs) one right draft per step does not repay a multi-token forward and drafting itself.
    assert calibrate_draft_confidence(base, dataset, draft_fn=LookUpDrafts(sequences)).threshold == 1.0
    # Without drafting overhead it does: two tokens for 1 + 0.65 + 0.05, and a chain cut to nothing costs nothing.
    cheap = calibrate_draft_confidence(base, dataset, draft_fn=LookUpDrafts(sequences), drafting_overhead=0.0)
    assert cheap.threshold == 0.84
    assert 1.1 < cheap.expected_speed_up <= 2 / 1.7 + 1e-9
    # A step that verifies nothing pays no fixed cost: only the overhead separates its cost from plain decoding.
    never = calibrate_draft_confidence(
        base, dataset, draft_fn=LookUpDrafts(sequences), drafting_overhead=0.0, thresholds=[0.9]
    )
    assert never.drafts_per_step == [0.0] and never.speed_ups == [1.0]


def test_calibration_replays_the_decoding_loop():
    base = make_base(CALIBRATION_BASE, eos_token_id=None)
    model = make_otter(base, num_draft_heads=4)
    dataset, sequences = self_distilled(base)
    thresholds = [0.0, 0.02, 0.04, 0.06]
    calibration = calibrate_draft_confidence(model, dataset, thresholds=thresholds)
    assert 0 < calibration.drafts_per_step[2] < 4  # a threshold that cuts some chains and not others
    for index, threshold in enumerate(thresholds):
        steps = []
        for row in range(len(sequences)):
            prompt = sequences[row : row + 1, :PROMPT_LENGTH]
            output = speculative(
                model,
                prompt,
                torch.ones_like(prompt),
                max_new_tokens=COMPLETION_LENGTH,
                draft_confidence_threshold=threshold,
            )
            assert torch.equal(output.sequences, sequences[row : row + 1])
            steps += output.accepted_tokens_per_step
        assert calibration.accepted_tokens_per_step[index] == pytest.approx(sum(steps) / len(steps))


def test_calibration_refuses_bad_costs_and_thresholds():
    base = make_base(CALIBRATION_BASE, eos_token_id=None)
    dataset, _ = self_distilled(base, num_prompts=1)
    model = otter_hf.insert(base, num_draft_heads=2)
    with pytest.raises(ValueError, match="`verification_cost` must be a non-negative number"):
        calibrate_draft_confidence(model, dataset, verification_cost=-0.1)
    with pytest.raises(ValueError, match="`verification_fixed_cost` must be a non-negative number"):
        calibrate_draft_confidence(model, dataset, verification_fixed_cost=-1)
    with pytest.raises(ValueError, match=r"`thresholds` must be candidates in \[0, 1\)"):
        calibrate_draft_confidence(model, dataset, thresholds=[0.5, 1.0])
    with pytest.raises(ValueError, match="no completion tokens"):
        calibrate_draft_confidence(model, Dataset.from_dict({"input_ids": [[5, 6, 7]], "completion_mask": [[1, 0, 0]]}))


# -- sampling -------------------------------------------------------------------------------------------------

SAMPLING = dict(do_sample=True, repetition_penalty=1.3, temperature=0.8, top_k=6, top_p=0.9)
SMALL_VOCABULARY = 16


def sampling_processors():
    """What generate() applies with SAMPLING: its processors, then its warpers, in its order."""
    return LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            TemperatureLogitsWarper(0.8),
            TopKLogitsWarper(6),
            TopPLogitsWarper(0.9),
        ]
    )


def make_peaked_base():
    """A base over 16 tokens whose next-token distributions are peaked enough for drafts to be accepted often,
    but far from always."""
    base = make_base("llama-mha-untied", vocab_size=SMALL_VOCABULARY, eos_token_id=None)
    with torch.no_grad():
        base.lm_head.weight.mul_(20)
    return base


class GreedyChainDrafts:
    """Drafts the model's own raw greedy continuation of the sequence so far (recomputed, no cache)."""

    def __init__(self, model, num_drafts):
        self.model, self.num_drafts = model, num_drafts

    def __call__(self, input_ids, hidden_states, inserted_hidden_states):
        sequences = input_ids
        for _ in range(self.num_drafts):
            next_tokens = self.model(input_ids=sequences).logits[:, -1].argmax(-1, keepdim=True)
            sequences = torch.cat([sequences, next_tokens], dim=-1)
        return sequences[:, input_ids.shape[1] :]


@torch.no_grad()
def exact_distribution(model, prompt, num_tokens):
    """The probability of every continuation of `prompt` with `num_tokens` tokens under SAMPLING."""
    distribution = {(): 1.0}
    for _ in range(num_tokens):
        prefixes = list(distribution)
        sequences = torch.cat(
            [prompt.expand(len(prefixes), -1), torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), -1)], dim=-1
        )
        scores = sampling_processors()(sequences, model(input_ids=sequences).logits[:, -1].float())
        probabilities = scores.softmax(-1)
        distribution = {
            prefix + (token,): distribution[prefix] * float(probabilities[row, token])
            for row, prefix in enumerate(prefixes)
            for token in range(SMALL_VOCABULARY)
            if probabilities[row, token] > 0
        }
    return distribution


def total_variation(counts: Counter, distribution: dict) -> float:
    total = sum(counts.values())
    keys = set(counts) | set(distribution)
    return 0.5 * sum(abs(counts[key] / total - distribution.get(key, 0.0)) for key in keys)


@pytest.fixture
def one_thread():
    """Many calls on a tiny model: one thread is fastest, and stays fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("batch_size, calls", [(1, 300), (40, 8)])
def test_sampling_draws_from_the_distribution_of_plain_sampling(one_thread, batch_size, calls):
    base = make_peaked_base()
    prompt = torch.tensor([[5, 9, 3, 12]])
    new_tokens = 3
    exact = exact_distribution(base, prompt, new_tokens)
    inputs = prompt.expand(batch_size, -1)
    torch.manual_seed(0)
    samples, steps = Counter(), []
    for _ in range(calls):
        output = speculative(
            base,
            inputs,
            torch.ones_like(inputs),
            draft_fn=GreedyChainDrafts(base, 2),
            max_new_tokens=new_tokens,
            **SAMPLING,
        )
        samples.update(map(tuple, output.sequences[:, prompt.shape[1] :].tolist()))
        steps += output.accepted_tokens_per_step
    # Drafts were accepted and rejected: both branches of the acceptance rule ran.
    assert min(steps) == 1 and (max(steps) > 1 or batch_size > 1)
    # As close to the exact distribution as 99 % of samples of the same size drawn from it.
    generator = torch.Generator().manual_seed(0)
    outcomes, probabilities = list(exact), torch.tensor(list(exact.values()))
    null = sorted(
        total_variation(
            Counter(
                outcomes[i]
                for i in torch.multinomial(probabilities, sum(samples.values()), True, generator=generator).tolist()
            ),
            exact,
        )
        for _ in range(200)
    )
    assert total_variation(samples, exact) <= null[197]


def test_sampling_without_drafts_draws_what_generate_draws():
    base = make_base("llama-gqa-tied")
    model = otter_hf.insert(base, num_draft_heads=4)  # threshold 1.0: drafting off
    input_ids, attention_mask = random_batch(2, 7, padding="left")
    torch.manual_seed(3)
    reference = greedy(base, input_ids, attention_mask, do_sample=True, temperature=0.9, top_k=20)

    def unconfident(ids, *streams):  # every chain cut to nothing
        return confident_logits(ids[:, -3:], 0.1)

    for options in ({}, {"draft_fn": unconfident, "draft_confidence_threshold": 0.5}):
        torch.manual_seed(3)
        output = speculative(model, input_ids, attention_mask, do_sample=True, temperature=0.9, top_k=20, **options)
        assert torch.equal(output.sequences, reference)


def test_sampling_is_reproducible_with_a_seed():
    base = make_peaked_base()
    input_ids = torch.tensor([[5, 9, 3, 12], [7, 4, 11, 6]])
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(
            speculative(base, input_ids, torch.ones_like(input_ids), draft_fn=GreedyChainDrafts(base, 3), **SAMPLING)
        )
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[0].accepted_tokens_per_step == outputs[1].accepted_tokens_per_step
    assert max(outputs[0].accepted_tokens_per_step) > 1
    assert not torch.equal(outputs[0].sequences, outputs[2].sequences)
