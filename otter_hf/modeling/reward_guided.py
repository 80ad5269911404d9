"""Reward-guided decoding at the cost of one k-token forward per new token, as a `generate()` decoding loop.

Pass the loop to transformers' own `generate()`:

```python
>>> from otter_hf.generation import reward_guided_generate

>>> output_ids = otter_model.generate(
...     **inputs, custom_generate=reward_guided_generate, reward_weight=1.5, reward_top_k=10, max_new_tokens=64
... )
```

`generate()` prepares the generation config, the logits processors, the stopping criteria, the cache and the
padding-aware position ids exactly as for its own loops, then hands them to `reward_guided_generate`.

Per step, the `reward_top_k` candidates run through the model in one forward over the shared cached prefix.
That forward gives every candidate's reward (the Otter value) and its next-token hidden state; after choosing,
the cache keeps the winner's keys and values (original and inserted heads alike) and the LM head runs on the
winner's hidden state, so the next step needs no further forward.
"""

import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerateDecoderOnlyOutput,
    LogitNormalization,
    MinPLogitsWarper,
    SynthIDTextWatermarkLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    WatermarkLogitsProcessor,
)

from .candidates import (
    candidate_attention_mask,
    check_candidates_attend_by_position,
    check_candidates_can_share_the_prefix,
    check_guidance_model,
    check_within_sliding_window,
    score_candidates,
)
from .guidance_weight import check_guidance_weight
from .loop_inputs import cache_field, pop_cache, pop_prepared_inputs

# What generate() appends after the processors a user passes: the reward goes in between, exactly where
# `OtterRewardLogitsProcessor` sits when passed in `logits_processor`.
PROCESSORS_AFTER_USER_PROCESSORS = (
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    WatermarkLogitsProcessor,
    SynthIDTextWatermarkLogitsProcessor,
    LogitNormalization,
)


def split_at_reward(logits_processor: LogitsProcessorList) -> tuple[LogitsProcessorList, LogitsProcessorList]:
    """Split generate()'s prepared processors into those before the reward and the sampling warpers after it."""
    after = [isinstance(processor, PROCESSORS_AFTER_USER_PROCESSORS) for processor in logits_processor]
    split = after.index(True) if True in after else len(logits_processor)
    return LogitsProcessorList(logits_processor[:split]), LogitsProcessorList(logits_processor[split:])


def keep_winning_candidate(cache: DynamicCache, past_length: int, winner: torch.LongTensor) -> None:
    """Drop the losing candidates from every cache layer, original and inserted, keeping each row's winner."""
    rows = torch.arange(winner.shape[0], device=winner.device)
    for layer in cache.layers:
        if layer.keys is None:  # a layer caching nothing (Gemma 4's KV-sharing layers reuse earlier layers' keys)
            continue
        winner_positions = past_length + winner.to(layer.keys.device)
        layer.keys[:, :, past_length] = layer.keys[rows, :, winner_positions]
        layer.values[:, :, past_length] = layer.values[rows, :, winner_positions]
        layer.crop(1 + past_length - layer.keys.shape[-2])


@torch.no_grad()
def reward_guided_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    reward_weight: float | None = None,
    reward_top_k: int = 10,
    **model_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    r"""
    Greedy or sampled decoding with ARGS reward guidance from the Otter value head, for
    `model.generate(..., custom_generate=reward_guided_generate)`.

    Per step the `reward_top_k` best tokens `v` of the processed scores are rescored as
    `score(v) + reward_weight * r(prefix + v)`; greedy search takes the best, sampling draws among them after
    the sampling warpers. The tokens equal those of `OtterRewardLogitsProcessor(model, reward_weight,
    reward_top_k)` passed to `generate()` with the same settings (and, when sampling, the same seed), at
    the cost of one forward of `reward_top_k` tokens per new token.

    Args:
        reward_weight (`float`): the reward weight `w`. With 0 this is the model's ordinary decoding, run on the
            original stream alone, token for token what the base model generates.
        reward_top_k (`int`, *optional*, defaults to 10): candidates rescored per step.

    The other arguments are the ones `generate()` prepares for its own decoding loops. With
    `return_dict_in_generate=True` the returned cache already holds the last generated token (its candidate
    forward cached it), unlike generate()'s own loops.
    """
    if reward_weight is None:
        raise ValueError("Reward-guided decoding needs `reward_weight=...` (0 switches guidance off).")
    check_guidance_weight("reward_weight", reward_weight)
    check_guidance_model(model, reward_top_k)
    if generation_config.num_beams > 1 or generation_config.num_return_sequences > 1:
        raise ValueError("Reward-guided decoding is greedy or sampled: set num_beams=1 and num_return_sequences=1.")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError("Reward-guided decoding does not return attentions or hidden states.")
    if not model_kwargs.get("use_cache", True):
        raise ValueError("Reward-guided decoding shares the cached prefix between candidates: leave use_cache=True.")
    if reward_weight == 0:
        # Guidance off: generate()'s own greedy/sampling loop on the original stream, exactly the base model.
        with model.otter_disabled():
            return GenerationMixin._sample(
                model,
                input_ids,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                generation_config=generation_config,
                **model_kwargs,
            )

    check_candidates_can_share_the_prefix(model.config)
    cache = pop_cache(model_kwargs)
    if not isinstance(cache, DynamicCache) or cache.get_seq_length() > 0:
        raise ValueError(
            f"Reward-guided decoding starts from an empty DynamicCache, which it crops to the winning candidate at "
            f"every step; got a {type(cache).__name__} holding {cache.get_seq_length() if cache is not None else 0} "
            "tokens. Pass no cache and leave `cache_implementation` unset (token-level guidance, "
            "`token_reward_weight`, works with a static cache)."
        )
    attention_mask, padding_mask, position_ids = pop_prepared_inputs(input_ids, model_kwargs, "Reward-guided decoding")
    check_within_sliding_window(model.config, generation_config.max_length + reward_top_k)
    check_candidates_attend_by_position(model.config)

    batch_size = input_ids.shape[0]
    device = input_ids.device
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    before_reward, after_reward = split_at_reward(logits_processor)
    return_dict = generation_config.return_dict_in_generate
    all_scores = () if return_dict and generation_config.output_scores else None
    all_logits = () if return_dict and generation_config.output_logits else None

    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_token_logits = outputs.logits[:, -1].to(dtype=torch.float32, device=device)
    del outputs
    candidate_positions = (position_ids[:, -1:] + 1).expand(-1, reward_top_k)
    unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, device=device)

    while True:
        scores = before_reward(input_ids, next_token_logits)
        candidate_scores, candidates = scores.topk(reward_top_k, dim=-1)
        past_length = cache.get_seq_length()
        hidden_states, values = score_candidates(
            model,
            candidates,
            candidate_attention_mask(padding_mask, 0, reward_top_k, model.dtype),
            candidate_positions,
            cache,
        )
        guided_scores = candidate_scores + reward_weight * values.to(device=device, dtype=candidate_scores.dtype)
        next_token_scores = after_reward(
            input_ids, torch.full_like(scores, float("-inf")).scatter(-1, candidates, guided_scores)
        )
        if all_scores is not None:
            all_scores += (next_token_scores,)
        if all_logits is not None:
            all_logits += (next_token_logits,)

        if generation_config.do_sample:
            probs = torch.nn.functional.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
        # A finished row's padding is no candidate; it keeps candidate 0, which nothing reads any more.
        winner = (candidates == next_tokens[:, None]).int().argmax(-1)
        keep_winning_candidate(cache, past_length, winner)

        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        padding_mask = torch.cat([padding_mask, padding_mask.new_ones(batch_size, 1)], dim=-1)
        candidate_positions = candidate_positions + 1
        unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, all_scores)
        if unfinished_sequences.max() == 0:
            break
        winner_hidden = hidden_states[rows, winner.to(hidden_states.device)]
        next_token_logits = model.logits_from_hidden(winner_hidden).to(dtype=torch.float32, device=device)

    if return_dict:
        return GenerateDecoderOnlyOutput(
            sequences=input_ids, scores=all_scores, logits=all_logits, **{cache_field(GenerateDecoderOnlyOutput): cache}
        )
    return input_ids
