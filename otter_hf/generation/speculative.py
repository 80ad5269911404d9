"""Speculative decoding where the model drafts for itself, as a `generate()` decoding loop.

An Otter model with draft heads (trained with `OtterDraftTrainer`) proposes the tokens after the next one, and the
same model verifies them. Two kinds of heads draft:

- a recurrent draft head (`otter_hf.insert(base, num_recurrent_drafts=5)`, EAGLE-style): each draft comes from the
  hidden state the head predicted for the token before it, so it knows the tokens it continues. It reads the
  original stream alone, so decoding with it runs the base computation only (`otter_disabled()`). A model that
  has one drafts with it;
- Medusa-style heads (`num_draft_heads=4`): head k guesses the token k + 2 ahead from the final streams at one
  position.

```python
>>> from otter_hf.generation import calibrate_draft_confidence, speculative_generate

>>> otter_model.config.draft_confidence_threshold = calibrate_draft_confidence(otter_model, held_out).threshold
>>> output_ids = otter_model.generate(**inputs, custom_generate=speculative_generate, max_new_tokens=64)
```

Each step, with the cache holding every accepted token:

1. the LM head's processed scores at the last accepted position give the next token `t1` (its argmax, or a sample
   with `do_sample=True`), and the drafter proposes `d2 ... d(K+1)` from the final hidden states at that position
   (and `t1`), each draft the argmax of its logits;
2. the chain of drafts is cut before the first draft whose confidence (its head's softmax probability of it) does
   not exceed `draft_confidence_threshold`; in a batch, the shortest chain of an unfinished row sets the length;
3. one forward of `[t1, d2, ..., dn]` over the cache gives the LM logits after each of them (with no draft left,
   that is an ordinary one-token step);
4. `t1` and the longest prefix of drafts that every unfinished row accepts are kept; the keys and values of the
   other drafts are cropped from every cache layer (the original and the inserted ones);
5. the final hidden states at the last kept position give the next step's LM logits and drafts, so every step
   costs exactly one forward.

Greedy search (`do_sample=False`) accepts a draft when it is the argmax of the processed scores after the tokens
before it, so the output is the model's own greedy output (for an Otter model, the base model's, whose logits
Otter leaves untouched). In a batch every row keeps the smallest count any unfinished row accepts, which keeps one
cache length for all rows and is still exact for each.

Sampling (`do_sample=True`) uses the speculative acceptance rule of Leviathan et al. (2023) and Chen et al. (2023)
with a deterministic proposal (the head's argmax, so the draft distribution is one-hot): with `p` the model's
sampling distribution after the tokens before a draft `d` (softmax of the scores after generate's processors and
warpers: temperature, top-k, top-p, ...), `d` is accepted with probability `p(d)`; otherwise the token there is
drawn from `p` with `d` removed and renormalised, and the chain stops. Either way the token has distribution `p`
exactly. After a fully accepted chain the next token is drawn from `p` as usual. In a batch, the first draft that
some row rejects ends the chain for every row; there, a row that rejected draws from its residual distribution and
a row that accepted keeps the draft it accepted. (Drawing afresh from `p` there would make the draft too rare: the
row's own rejections end the chain as well, and those are not redrawn.) Either token becomes the first one of the
next step. The argmax proposal keeps the draft independent of the warpers, so the rule is exact for any processor
a sampling `generate()` applies.

The confidence threshold makes drafting pay (or stop): 0.0 verifies every draft, 1.0 never drafts. A model's own
heads draft only for batches of at most `config.draft_max_batch_size` rows (1 by default): in a batch a step keeps
the fewest drafts any row accepts, so at batch 4 the recurrent head of SmolLM2-135M keeps 1.007 tokens per step
and decodes at 0.83x plain greedy's speed with its batch-1 threshold (`python benchmarks/speculative.py`, 2 CPU
cores, `benchmarks/README.md`). With drafting switched off entirely (threshold 1.0),
decoding is `generate()`'s own greedy or sampling loop over the base computation only (an Otter model runs under
`otter_disabled()`, so the inserted stream costs nothing): the same tokens, and with `do_sample=True` the same
random draws, as ordinary `generate()`, at its cost. An Otter model reads the threshold from
`config.draft_confidence_threshold`, whose default 1.0 keeps a model with untrained heads as fast as plain
decoding until `calibrate_draft_confidence` (in `otter_hf.generation.draft_calibration`) finds a threshold at
which its heads pay.

One caveat is numerical, not algorithmic: a forward over several tokens rounds differently from as many one-token
forwards, so on a real model a near-tie between the two best tokens can occasionally resolve the other way.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.generation import GenerateDecoderOnlyOutput

from ..modeling.inserted_heads import is_probability
from ..modeling.loop_inputs import cache_field, pop_cache, pop_prepared_inputs

# (sequences ending with the token the LM head fixed, final hidden states of the original stream at the position
# before it, the same for the inserted stream or None) -> draft logits (batch, num_drafts, vocab_size), or draft
# token ids (batch, num_drafts), which carry no confidence
DraftFunction = Callable[[torch.LongTensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class SpeculativeDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """
    [`~transformers.generation.GenerateDecoderOnlyOutput`], plus:

    accepted_tokens_per_step (`list[int]`):
        Tokens added to the sequences by each verification forward (the next token plus the accepted drafts, so
        between 1 and K + 1). Their mean is the speed-up in forwards over one-token decoding.
    """

    accepted_tokens_per_step: list[int] | None = None


def draft_confidence(draft_logits: torch.Tensor) -> torch.Tensor:
    """A draft head's confidence in its draft: the softmax probability of its argmax token (float32)."""
    return draft_logits.float().softmax(-1).amax(-1)


def confident_draft_logits(
    draft_hidden: torch.Tensor, logits_from_hidden: Callable[[torch.Tensor], torch.Tensor], confidence_threshold: float
) -> torch.Tensor:
    """The logits `(batch, num_drafts, vocab_size)` of the leading draft heads, decoded one head at a time.

    Decoding stops after the first head whose confidence no row exceeds `confidence_threshold`: speculative decoding
    cuts the chain there, so the heads after it need no LM head (on a small model, decoding every head costs about
    as much as a forward of the model itself).

    Args:
        draft_hidden: `(batch, num_heads, hidden_size)`, the draft heads' hidden states.
        logits_from_hidden: decodes hidden states into logits (the LM head).
        confidence_threshold: the threshold `speculative_generate` applies.
    """
    logits = []
    for head in range(draft_hidden.shape[-2]):
        logits.append(logits_from_hidden(draft_hidden[:, head]))
        if draft_confidence(logits[-1]).max() <= confidence_threshold:
            break
    return torch.stack(logits, dim=1)


def otter_draft_heads(model, confidence_threshold: float = 0.0) -> DraftFunction:
    """The draft logits of an Otter model's own draft heads (head k predicts the token k + 2 ahead), decoded only as
    far as `confident_draft_logits` needs for `confidence_threshold`."""

    def draft(input_ids, hidden_states, inserted_hidden_states):
        draft_hidden = model.draft_heads(hidden_states, inserted_hidden_states)
        return confident_draft_logits(draft_hidden, model.logits_from_hidden, confidence_threshold)

    return draft


def otter_recurrent_drafts(model, confidence_threshold: float = 0.0) -> DraftFunction:
    """The drafts of an Otter model's recurrent draft head: up to `num_recurrent_drafts` tokens, each drafted from
    the hidden state the head predicted for the token before it, stopping after the first draft whose confidence
    no row exceeds `confidence_threshold`. Its logits cover the draft vocabulary; the other tokens get -inf."""
    head = model.recurrent_draft_head

    def draft(input_ids, hidden_states, inserted_hidden_states):
        features, token = hidden_states, input_ids[:, -1]
        logits = []
        for _ in range(model.config.num_recurrent_drafts):
            features = head.step(features, model.token_embeddings(token))
            logits.append(head.draft_logits(features).float())
            if draft_confidence(logits[-1]).max() <= confidence_threshold:
                break
            token = head.draft_token_ids[logits[-1].argmax(-1)]
        draft_vocab_logits = torch.stack(logits, dim=1)
        full_logits = draft_vocab_logits.new_full(
            (*draft_vocab_logits.shape[:2], model.config.vocab_size), float("-inf")
        )
        return full_logits.index_copy_(-1, head.draft_token_ids, draft_vocab_logits)

    return draft


def has_recurrent_draft_head(model) -> bool:
    return getattr(model, "recurrent_draft_head", None) is not None


def otter_drafts(model, confidence_threshold: float = 0.0) -> DraftFunction:
    """An Otter model's own drafter: its recurrent draft head when it has one, else its Medusa-style heads."""
    if has_recurrent_draft_head(model):
        return otter_recurrent_drafts(model, confidence_threshold)
    return otter_draft_heads(model, confidence_threshold)


def check_speculative_model(model, draft_fn: DraftFunction | None) -> None:
    """Raise a clear error when `model` cannot draft (without `draft_fn`) or its cache cannot be cropped."""
    config = model.config
    if draft_fn is None and not has_recurrent_draft_head(model):
        if getattr(config, "inserted_hidden_size", None) is None:
            raise TypeError(
                f"Speculative decoding drafts with an Otter model's draft heads; {type(model).__name__} has none. "
                "Build one with `otter_hf.insert(base_model, num_recurrent_drafts=5)` (or Medusa-style heads with "
                "`num_draft_heads=4`), or pass your own `draft_fn`."
            )
        if getattr(model, "draft_heads", None) is None:
            raise ValueError(
                "This Otter model has no draft heads. Insert a recurrent one with `otter_hf.insert(base_model, "
                "num_recurrent_drafts=5)` (or Medusa-style ones with `num_draft_heads=4`) and train it with "
                "`OtterDraftTrainer`, or pass your own `draft_fn`."
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


def _check_draft_confidence_threshold(threshold) -> None:
    if not is_probability(threshold):
        raise ValueError(
            "`draft_confidence_threshold` must be a number in [0, 1] (0 verifies every draft, 1 never drafts), "
            f"got {threshold!r}."
        )


def _draft_confidence_threshold(
    model, draft_fn: DraftFunction | None, threshold: float | None, batch_size: int
) -> float:
    if threshold is None:
        # The config's threshold belongs to the model's own heads, for which it was calibrated; a `draft_fn` has
        # all its drafts verified unless the call says otherwise.
        threshold = model.config.draft_confidence_threshold if draft_fn is None else 0.0
    _check_draft_confidence_threshold(threshold)
    if draft_fn is None and batch_size > model.config.draft_max_batch_size:
        return 1.0  # a batch too large to gain from drafting: see `draft_max_batch_size`
    return float(threshold)


def _drafts_to_verify(
    draft_fn: DraftFunction,
    sequences: torch.LongTensor,
    hidden: torch.Tensor,
    inserted_hidden: torch.Tensor | None,
    confidence_threshold: float,
    unfinished_sequences: torch.LongTensor,
    max_drafts: int,
) -> torch.LongTensor:
    """The drafts `(batch, num_drafts)` worth a verification: each row's chain ends before its first draft whose
    confidence does not exceed the threshold, and the shortest chain of an unfinished row sets `num_drafts`."""
    proposal = draft_fn(sequences, hidden, inserted_hidden)
    if proposal.dim() not in (2, 3):
        raise ValueError(
            "`draft_fn` must return draft logits (batch, num_drafts, vocab_size) or draft token ids "
            f"(batch, num_drafts); got a tensor of shape {tuple(proposal.shape)}."
        )
    proposal = proposal[:, :max_drafts]
    if not proposal.is_floating_point():  # token ids carry no confidence: every one is verified
        return proposal.to(device=sequences.device, dtype=torch.long)
    drafts = proposal.argmax(-1)
    confident = draft_confidence(proposal) > confidence_threshold
    chain_lengths = confident.long().cumprod(-1).sum(-1)
    num_drafts = int(chain_lengths[unfinished_sequences.bool().to(chain_lengths.device)].min())
    return drafts[:, :num_drafts].to(device=sequences.device, dtype=torch.long)


def _draft_scores(logits_processor, input_ids, candidates, logits):
    """Processed scores that judge each draft: those after candidate j (the sequence up to it) judge draft j + 1."""
    scores = [
        logits_processor(torch.cat([input_ids, candidates[:, : j + 1]], dim=-1), logits[:, j])
        for j in range(candidates.shape[1] - 1)
    ]
    return torch.stack(scores, dim=1) if scores else logits[:, :0]


def _next_tokens(
    scores: torch.Tensor,
    do_sample: bool,
    kept_drafts: torch.LongTensor | None,
    rejected_drafts: torch.LongTensor | None,
) -> torch.LongTensor:
    """The token the LM head gives each row: the argmax, or a sample as `generate()` draws it. Where the last
    verification settled a row's token, a sample uses that: the draft it accepted, or a draw without the draft it
    rejected (-1 marks rows it did not settle)."""
    if not do_sample:
        return scores.argmax(-1)
    probabilities = torch.nn.functional.softmax(scores, dim=-1)
    if rejected_drafts is not None:
        # The residual distribution of the acceptance rule: p with the rejected draft's mass removed
        # (multinomial renormalises).
        removed = torch.zeros_like(probabilities, dtype=torch.bool)
        rows = rejected_drafts >= 0
        removed[rows, rejected_drafts[rows]] = True
        probabilities = probabilities.masked_fill(removed, 0.0)
    tokens = torch.multinomial(probabilities, num_samples=1).squeeze(1)
    if kept_drafts is not None:
        tokens = torch.where(kept_drafts >= 0, kept_drafts, tokens)
    return tokens


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    draft_fn: DraftFunction | None = None,
    draft_confidence_threshold: float | None = None,
    **model_kwargs,
) -> SpeculativeDecoderOnlyOutput | torch.LongTensor:
    r"""
    Speculative decoding, for `model.generate(..., custom_generate=speculative_generate)`.

    Greedy search (`do_sample=False`) gives the model's greedy output token for token, and sampling
    (`do_sample=True`, with any warpers) draws from exactly the distribution ordinary sampling draws from, at fewer
    forwards; see the module docstring for the algorithm. Logits processors (repetition penalty, `min_new_tokens`,
    ...) and stopping criteria apply as in `generate()`'s own loops. With `return_dict_in_generate=True` the output
    also lists the tokens accepted per step.

    Args:
        draft_fn (`Callable`, *optional*):
            Proposes the drafts: called as `draft_fn(input_ids, hidden_states, inserted_hidden_states)` with the
            sequences so far, which end with the token the LM head has fixed, and the final (post-norm) hidden
            states `(batch, hidden_size)` of the original and the inserted stream (None without one) at the
            position before that token. It returns draft logits `(batch, num_drafts, vocab_size)` for the positions
            after that token: the drafts are their argmax and the confidences their softmax probabilities. It may
            instead return draft token ids `(batch, num_drafts)`, which carry no confidence and are all verified
            whenever drafting is on. Drafts beyond the requested length are ignored, and fewer are fine. Defaults
            to the Otter model's draft heads. With a `draft_fn`, any causal LM with a DynamicCache can decode
            speculatively.
        draft_confidence_threshold (`float`, *optional*):
            In [0, 1]: a chain of drafts ends before the first draft whose confidence does not exceed it; 0 verifies
            every draft and 1 never drafts, decoding one token per forward of the base computation alone. Defaults
            to `model.config.draft_confidence_threshold` for the model's own draft heads (1.0 until calibrated with
            `calibrate_draft_confidence`), and to 0 with a `draft_fn`. The model's own heads draft only for
            batches of at most `model.config.draft_max_batch_size` rows (default 1); larger ones decode with
            drafting off.

    The other arguments are the ones `generate()` prepares for its own decoding loops.
    """
    check_speculative_model(model, draft_fn)
    confidence_threshold = _draft_confidence_threshold(model, draft_fn, draft_confidence_threshold, input_ids.shape[0])
    if generation_config.num_beams > 1:
        raise ValueError("Speculative decoding runs greedy search or sampling over a single beam: set num_beams=1.")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError("Speculative decoding does not return attentions or hidden states.")
    if not model_kwargs.get("use_cache", True):
        raise ValueError("Speculative decoding verifies drafts against the cached prefix: leave use_cache=True.")

    if confidence_threshold < 1.0:
        # The recurrent draft head reads the original stream alone: the inserted one need not run.
        base_computation_only = draft_fn is None and has_recurrent_draft_head(model)
        draft_fn = draft_fn or otter_drafts(model, confidence_threshold)
        with model.otter_disabled() if base_computation_only else contextlib.nullcontext():
            return _decode(
                model,
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                draft_fn,
                confidence_threshold,
                model_kwargs,
            )
    # Drafting is off: generate()'s own decoding loop, with nothing but the base computation to pay for (it is
    # 2-10 % faster than `_decode` with every chain cut to nothing, on SmolLM2-135M at batch 1-4).
    with model.otter_disabled() if hasattr(model, "otter_disabled") else contextlib.nullcontext():
        output = model._sample(input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs)
    if not generation_config.return_dict_in_generate:
        return output
    new_tokens = output.sequences.shape[1] - input_ids.shape[1]
    return SpeculativeDecoderOnlyOutput(**output, accepted_tokens_per_step=[1] * new_tokens)


def _decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    draft_fn: DraftFunction,
    confidence_threshold: float,
    model_kwargs: dict,
) -> SpeculativeDecoderOnlyOutput | torch.LongTensor:
    """The drafting loop of `speculative_generate`."""
    cache = pop_cache(model_kwargs)
    if cache is None:
        cache = DynamicCache(config=model.config)
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"Speculative decoding crops the cache, which needs a DynamicCache; got {type(cache).__name__}."
        )
    attention_mask, _, position_ids = pop_prepared_inputs(input_ids, model_kwargs, "Speculative decoding")

    batch_size = input_ids.shape[0]
    device = input_ids.device
    do_sample = generation_config.do_sample
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
    last_hidden = hidden[:, -1]
    last_inserted = inserted_hidden[:, -1] if inserted_hidden is not None else None
    unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=device)
    # Sampling only: for each row, the draft the last verification accepted where the chain ended, or the draft it
    # rejected there (-1 for the other kind); None after a chain every row accepted.
    kept_drafts = rejected_drafts = None

    while True:
        next_token_scores = logits_processor(input_ids, next_token_logits)
        next_tokens = _next_tokens(next_token_scores, do_sample, kept_drafts, rejected_drafts)
        # The last token can only be the one the LM head gives; drafts would run past max_length.
        max_drafts = max(0, generation_config.max_length - input_ids.shape[1] - 1)
        if max_drafts > 0:
            sequences = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            drafts = _drafts_to_verify(
                draft_fn, sequences, last_hidden, last_inserted, confidence_threshold, unfinished_sequences, max_drafts
            )
        else:
            drafts = input_ids.new_empty(batch_size, 0)
        candidates = torch.cat([next_tokens[:, None], drafts], dim=-1)
        num_candidates = candidates.shape[1]

        positions = next_position + torch.arange(num_candidates, device=device)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, num_candidates)], dim=-1)
        verify_logits, hidden, inserted_hidden = forward(candidates, positions, attention_mask, logits_to_keep=0)
        draft_scores = _draft_scores(logits_processor, input_ids, candidates, verify_logits)
        if drafts.shape[1] == 0:  # a chain cut to nothing: no test to run, and no random draw spent on one
            accepted = drafts.bool()
        elif do_sample:
            draft_probabilities = draft_scores.softmax(-1).gather(-1, drafts[..., None]).squeeze(-1)
            accepted = torch.rand_like(draft_probabilities) < draft_probabilities
        else:
            accepted = drafts == draft_scores.argmax(-1)
        # Rows that have finished accept anything: their tokens are padding from now on.
        accepted = accepted | ~unfinished_sequences.bool()[:, None]
        num_accepted_drafts = int(accepted.long().cumprod(-1).sum(-1).min()) if drafts.shape[1] else 0
        num_rejected = num_candidates - 1 - num_accepted_drafts
        if num_rejected:
            cache.crop(-num_rejected)
            attention_mask = attention_mask[:, :-num_rejected] if attention_mask is not None else None
        kept_drafts = rejected_drafts = None
        if do_sample and num_rejected:
            # Each row's own test settles its token where the chain ended (see the module docstring).
            stop_drafts, stop_accepted = drafts[:, num_accepted_drafts], accepted[:, num_accepted_drafts]
            kept_drafts = torch.where(stop_accepted, stop_drafts, -1)
            rejected_drafts = torch.where(stop_accepted, -1, stop_drafts)

        accepted_scores = torch.cat((next_token_scores[:, None], draft_scores), dim=1)
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
        if inserted_hidden is not None:
            last_inserted = inserted_hidden[:, num_accepted_drafts]

    if return_dict:
        return SpeculativeDecoderOnlyOutput(
            sequences=input_ids,
            scores=all_scores,
            logits=all_logits,
            accepted_tokens_per_step=accepted_tokens_per_step,
            **{cache_field(SpeculativeDecoderOnlyOutput): cache},
        )
    return input_ids
