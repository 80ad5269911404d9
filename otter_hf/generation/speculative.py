"""Greedy speculative decoding where the model drafts for itself, as a `generate()` decoding loop.

An Otter model with draft heads (`otter_hf.insert(base, num_draft_heads=4)`, trained with `OtterDraftTrainer`)
proposes the tokens after the next one from the inserted stream, Medusa-style, and the same model verifies them:

```python
>>> from otter_hf.generation import speculative_generate

>>> output_ids = otter_model.generate(**inputs, custom_generate=speculative_generate, max_new_tokens=64)
```

Each step, with the cache holding every accepted token:

1. the LM head's logits at the last accepted position fix the next token `t1` (greedy, so it is certain), and the
   draft heads at that position propose `d2 ... d(K+1)`;
2. one forward of `[t1, d2, ..., d(K+1)]` over the cache gives the LM logits after each of them;
3. `t1` and the longest prefix of drafts that equal the argmax of those logits are accepted; the keys and values
   of the rejected drafts are cropped from every cache layer (the original and the inserted ones);
4. the final hidden states at the last accepted position give the next step's LM logits and drafts, so every step
   costs exactly one forward.

Greedy speculative decoding is exact: each accepted token is the argmax the model gives after the accepted tokens
before it, so the output is the model's own greedy output (for an Otter model, the base model's, whose logits
Otter leaves untouched). In a batch, every row accepts the smallest count any unfinished row accepts, which keeps
one cache length for all rows and is still exact for each. One caveat is numerical, not algorithmic: a forward
over K+1 tokens rounds differently from K+1 one-token forwards, so on a real model a near-tie between the two best
tokens can occasionally resolve the other way.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.generation import GenerateDecoderOnlyOutput

from .loop_inputs import pop_prepared_inputs

# (sequences ending with the token the LM head fixed, final hidden states of the original stream at the position
# before it, the same for the inserted stream or None) -> draft token ids (batch, num_drafts)
DraftFunction = Callable[[torch.LongTensor, torch.Tensor, torch.Tensor | None], torch.LongTensor]


@dataclass
class SpeculativeDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """
    [`~transformers.generation.GenerateDecoderOnlyOutput`], plus:

    accepted_tokens_per_step (`list[int]`):
        Tokens added to the sequences by each verification forward (the certain next token plus the accepted
        drafts, so between 1 and K + 1). Their mean is the speed-up in forwards over one-token decoding.
    """

    accepted_tokens_per_step: list[int] | None = None


def otter_draft_heads(model) -> DraftFunction:
    """The drafts of an Otter model's own draft heads: the argmax of head k predicts the token k + 2 ahead."""

    def draft(input_ids, hidden_states, inserted_hidden_states):
        return model.compute_draft_logits(hidden_states, inserted_hidden_states).argmax(-1)

    return draft


def check_speculative_model(model, draft_fn: DraftFunction | None) -> None:
    """Raise a clear error when `model` cannot draft (without `draft_fn`) or its cache cannot be cropped."""
    config = model.config
    if draft_fn is None:
        if getattr(config, "inserted_hidden_size", None) is None:
            raise TypeError(
                f"Speculative decoding drafts with an Otter model's draft heads; {type(model).__name__} has none. Build "
                "one with `otter_hf.insert(base_model, num_draft_heads=4)`, or pass your own `draft_fn`."
            )
        if getattr(model, "draft_heads", None) is None:
            raise ValueError(
                "This Otter model has no draft heads (`num_draft_heads=0`). Insert them with "
                "`otter_hf.insert(base_model, num_draft_heads=4)` and train them with `OtterDraftTrainer`, or pass "
                "your own `draft_fn`."
            )
        if not model.otter_enabled:
            raise ValueError(
                "The inserted stream is switched off (`otter_disabled()`), and the draft heads read it; switch it on "
                "or pass your own `draft_fn`."
            )
    _, layer_kwargs = get_layer_types_and_kwargs(config)
    if any(kwargs.get("sliding_window") is not None for kwargs in layer_kwargs):
        raise ValueError(
            "Speculative decoding drops rejected drafts by cropping the cache, which a sliding-window cache cannot "
            f"do (this {config.model_type} model has sliding-window layers). Use ordinary `generate()` for it."
        )


def _apply_processors(logits_processor, input_ids, candidates, logits):
    """Processed scores for the logits after each candidate: position j sees the sequence up to candidate j."""
    return torch.stack(
        [
            logits_processor(torch.cat([input_ids, candidates[:, : j + 1]], dim=-1), logits[:, j])
            for j in range(candidates.shape[1])
        ],
        dim=1,
    )


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    draft_fn: DraftFunction | None = None,
    **model_kwargs,
) -> SpeculativeDecoderOnlyOutput | torch.LongTensor:
    r"""
    Greedy speculative decoding, for `model.generate(..., custom_generate=speculative_generate)`.

    The output is the model's greedy output (`do_sample=False`), token for token, at fewer forwards; see the module
    docstring for the algorithm. Logits processors (repetition penalty, `min_new_tokens`, ...) and stopping
    criteria apply exactly as in greedy search. With `return_dict_in_generate=True` the output also lists the
    tokens accepted per step.

    Args:
        draft_fn (`Callable`, *optional*):
            Proposes the drafts: called as `draft_fn(input_ids, hidden_states, inserted_hidden_states)` with the
            sequences so far, which end with the token the LM head has fixed, and the final (post-norm) hidden
            states `(batch, hidden_size)` of the original and the inserted stream (None without one) at the
            position before that token. It returns draft token ids `(batch, num_drafts)` for the positions after
            that token; drafts beyond the requested length are ignored. Defaults to the Otter model's draft heads.
            With a `draft_fn`, any causal LM with a DynamicCache can decode speculatively.

    The other arguments are the ones `generate()` prepares for its own decoding loops.
    """
    check_speculative_model(model, draft_fn)
    if generation_config.do_sample or generation_config.num_beams > 1:
        raise ValueError(
            "Speculative decoding is exact for greedy search only: set do_sample=False and num_beams=1."
        )
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError("Speculative decoding does not return attentions or hidden states.")
    if not model_kwargs.get("use_cache", True):
        raise ValueError("Speculative decoding verifies drafts against the cached prefix: leave use_cache=True.")
    draft_fn = draft_fn or otter_draft_heads(model)

    cache = model_kwargs.pop("past_key_values", None)
    if cache is None:
        cache = DynamicCache(config=model.config)
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"Speculative decoding crops the cache, which needs a DynamicCache; got {type(cache).__name__}.")
    attention_mask, _, position_ids = pop_prepared_inputs(input_ids, model_kwargs, "Speculative decoding")

    batch_size = input_ids.shape[0]
    device = input_ids.device
    next_position = position_ids[:, -1:] + 1
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    return_dict = generation_config.return_dict_in_generate
    all_scores = () if return_dict and generation_config.output_scores else None
    all_logits = () if return_dict and generation_config.output_logits else None
    accepted_tokens_per_step = []

    def forward(tokens, positions, mask, logits_to_keep):
        outputs = model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=logits_to_keep,
        )
        inserted = getattr(outputs, "inserted_hidden_states", None)
        return outputs.logits.to(torch.float32), outputs.hidden_states[-1], inserted[-1] if inserted else None

    logits, hidden, inserted_hidden = forward(input_ids, position_ids, attention_mask, logits_to_keep=1)
    next_token_logits = logits[:, -1]
    last_hidden, last_inserted = hidden[:, -1], inserted_hidden[:, -1] if inserted_hidden is not None else None
    unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=device)

    while True:
        next_token_scores = logits_processor(input_ids, next_token_logits)
        next_tokens = next_token_scores.argmax(-1, keepdim=True)
        # The last token can only be the one the LM head fixes; drafts would run past max_length.
        num_drafts = max(0, generation_config.max_length - input_ids.shape[1] - 1)
        drafts = draft_fn(torch.cat([input_ids, next_tokens], dim=-1), last_hidden, last_inserted)
        drafts = drafts[:, :num_drafts].to(device=device, dtype=torch.long)
        candidates = torch.cat([next_tokens, drafts], dim=-1)
        num_candidates = candidates.shape[1]

        positions = next_position + torch.arange(num_candidates, device=device)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, num_candidates)], dim=-1)
        verify_logits, hidden, inserted_hidden = forward(candidates, positions, attention_mask, logits_to_keep=0)
        verify_scores = _apply_processors(logits_processor, input_ids, candidates, verify_logits)
        # Draft j is right when it is the argmax after the candidates before it; rows that have finished accept
        # anything, as their tokens are padding from now on.
        matches = (drafts == verify_scores[:, :-1].argmax(-1)) | ~unfinished_sequences.bool()[:, None]
        num_accepted_drafts = int(matches.long().cumprod(-1).sum(-1).min())
        num_rejected = num_candidates - 1 - num_accepted_drafts
        if num_rejected:
            cache.crop(-num_rejected)
            attention_mask = attention_mask[:, :-num_rejected] if attention_mask is not None else None

        accepted_scores = torch.cat((next_token_scores[:, None], verify_scores[:, :-1]), dim=1)
        accepted_logits = torch.cat((next_token_logits[:, None], verify_logits[:, :-1]), dim=1)
        for j in range(num_accepted_drafts + 1):
            tokens = candidates[:, j]
            if has_eos_stopping_criteria:
                tokens = tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            if all_scores is not None:
                all_scores += (accepted_scores[:, j],)
            if all_logits is not None:
                all_logits += (accepted_logits[:, j],)
            unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, all_scores)
            if unfinished_sequences.max() == 0:
                break
        accepted_tokens_per_step.append(j + 1)
        if unfinished_sequences.max() == 0:
            break

        next_position = next_position + num_accepted_drafts + 1
        next_token_logits = verify_logits[:, num_accepted_drafts]
        last_hidden = hidden[:, num_accepted_drafts]
        last_inserted = inserted_hidden[:, num_accepted_drafts] if inserted_hidden is not None else None

    if return_dict:
        return SpeculativeDecoderOnlyOutput(
            sequences=input_ids,
            scores=all_scores,
            logits=all_logits,
            past_key_values=cache,
            accepted_tokens_per_step=accepted_tokens_per_step,
        )
    return input_ids
