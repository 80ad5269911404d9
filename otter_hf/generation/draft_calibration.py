"""Choosing `draft_confidence_threshold` for speculative decoding, on held-out self-distilled data.

A draft is worth verifying only when it is likely to be accepted: a verification forward over more tokens costs
more than a one-token step, and drafting itself costs something every step (an Otter model runs its inserted
stream and decodes draft heads with the LM head). `calibrate_draft_confidence` replays greedy speculative decoding
on sequences the model generated itself (`build_self_distillation_dataset` writes them): there, teacher forcing
sees exactly the hidden states the decoding loop sees, so for every candidate threshold it can count the steps
the loop would take, the drafts it would verify and the tokens it would accept, without generating anything. It
prices them with a simple cost model and returns the threshold with the most tokens per unit of cost, or 1.0
(never draft) when no threshold beats plain decoding:

```python
>>> from otter_hf.generation import calibrate_draft_confidence

>>> calibration = calibrate_draft_confidence(otter_model, held_out_dataset)
>>> otter_model.config.draft_confidence_threshold = calibration.threshold  # saved with the model
```

The cost model, in one-token forwards of plain decoding: a step that verifies `n >= 1` drafts costs
`1 + drafting_overhead + verification_fixed_cost + verification_cost * n`, one whose chain was cut to nothing
`1 + drafting_overhead`, and a step of plain decoding 1. The fixed cost is what any forward over more than one
token costs beyond a one-token forward: on a CPU it is most of the price of verifying (SmolLM2-135M on 2 cores:
a 2-token forward costs 1.7 one-token forwards, a 6-token forward 1.8).

The replay is of greedy decoding. Sampling accepts a draft with the probability the model gives it rather than
whenever it is the argmax, so a threshold calibrated here is a starting point for sampling, not its optimum.
"""

from dataclasses import dataclass

import torch

from .speculative import (
    DraftFunction,
    check_speculative_model,
    draft_confidence,
    has_recurrent_draft_head,
    otter_recurrent_drafts,
)

# Candidate thresholds: 0.00, 0.01, ..., 0.99; 1.0 (never draft) is always the fallback.
DEFAULT_THRESHOLDS = tuple(step / 100 for step in range(100))
CONFIDENCE_BINS = 10


@dataclass
class DraftConfidenceCalibration:
    """
    What `calibrate_draft_confidence` measured, and the threshold it chose.

    threshold (`float`):
        The candidate with the best expected speed-up, or 1.0 (never draft) when none beats plain decoding.
    expected_speed_up (`float`):
        Tokens per unit of cost at `threshold`, against plain decoding (1.0 when drafting is off).
    thresholds (`list[float]`):
        The candidates; the next three lists hold one value per candidate.
    speed_ups (`list[float]`):
        Expected speed-up over plain decoding by the cost model.
    accepted_tokens_per_step (`list[float]`):
        Mean tokens per step (the next token plus the accepted drafts).
    drafts_per_step (`list[float]`):
        Mean drafts verified per step.
    acceptance_by_confidence (`list[tuple[float, float, int]]`):
        For ten equal confidence bins: the bin's lower edge, the fraction of drafts with a confidence in the bin
        that would be accepted when every draft before them in the chain is, and how many such drafts there were.
    """

    threshold: float
    expected_speed_up: float
    thresholds: list[float]
    speed_ups: list[float]
    accepted_tokens_per_step: list[float]
    drafts_per_step: list[float]
    acceptance_by_confidence: list[tuple[float, float, int]]


def _check_cost(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"`{name}` must be a non-negative number (in one-token forwards), got {value!r}.")


def _drafts_and_confidences(model, draft_fn, input_ids, positions, chunk_size=32):
    """The drafts `(len(positions), num_drafts)` and their confidences at each position of one sequence, from the
    teacher-forced final hidden states there (the draft heads at position t propose the tokens from t + 2 on)."""
    outputs = model(input_ids=input_ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    hidden = outputs.hidden_states[-1][0]
    inserted_states = getattr(outputs, "inserted_hidden_states", None)
    inserted = inserted_states[-1][0] if inserted_states else None
    drafts, confidences = [], []
    if draft_fn is None:
        # The model's own heads read hidden states alone, so every position is drafted at once.
        for start in range(0, len(positions), chunk_size):
            chunk = positions[start : start + chunk_size]
            logits = model.compute_draft_logits(hidden[chunk], inserted[chunk])
            drafts.append(logits.argmax(-1))
            confidences.append(draft_confidence(logits))
        return torch.cat(drafts), torch.cat(confidences)
    for position in positions.tolist():
        proposal = draft_fn(
            input_ids[:, : position + 2],
            hidden[position : position + 1],
            inserted[position : position + 1] if inserted is not None else None,
        )[0]
        if proposal.is_floating_point():
            drafts.append(proposal.argmax(-1))
            confidences.append(draft_confidence(proposal))
        else:  # token ids carry no confidence: every one is verified whenever drafting is on
            drafts.append(proposal)
            confidences.append(torch.ones(proposal.shape, device=proposal.device))
    return torch.stack(drafts), torch.stack(confidences)


@torch.no_grad()
def calibrate_draft_confidence(
    model,
    dataset,
    draft_fn: DraftFunction | None = None,
    verification_cost: float = 0.05,
    drafting_overhead: float = 0.3,
    verification_fixed_cost: float = 0.65,
    thresholds: list[float] | None = None,
) -> DraftConfidenceCalibration:
    r"""
    Measure how often drafts would be accepted at each confidence threshold, and pick the threshold that makes
    greedy speculative decoding fastest by a cost model, or 1.0 (never draft) when none beats plain decoding.

    Set the result as `model.config.draft_confidence_threshold`, where `speculative_generate` reads it and
    `save_pretrained` / `save_otter` save it. See the module docstring for the method.

    Args:
        model: an Otter model with draft heads, or any causal LM with a `draft_fn`.
        dataset: rows with `input_ids` and an optional `completion_mask` (1 where the token is generated), as
            `build_self_distillation_dataset` writes them; hold them out from the heads' training data. A step is
            replayed at every position whose next token is a completion token.
        draft_fn (`Callable`, *optional*):
            The drafter, as `speculative_generate` takes it; called once per position with the sequence up to the
            token after it. Defaults to the model's own drafter: its recurrent draft head (called per position as
            well), or its Medusa-style heads, which draft every position in one call.
        verification_cost (`float`, *optional*, defaults to 0.05):
            What each verified draft adds to a step, in one-token forwards, on top of `verification_fixed_cost`.
        drafting_overhead (`float`, *optional*, defaults to 0.3):
            What every step costs beyond a forward of the base model while drafting is on, even when the chain is
            cut to nothing: for Medusa-style heads on SmolLM2-135M (CPU), about 0.25-0.3 (the inserted stream and
            decoding the first head with the LM head, a fifth of that model); for the recurrent head, about 0.02.
        verification_fixed_cost (`float`, *optional*, defaults to 0.65):
            What a verification forward costs beyond a one-token forward whatever the number of drafts: measured
            at 0.5-0.8 for SmolLM2-135M on 2 CPU cores; near 0 on a GPU, where the defaults are far too high.
            The defaults are that CPU's, so that a model is not made slower by a calibration run without measured
            costs.
        thresholds (`list[float]`, *optional*):
            The candidates, each in [0, 1); defaults to 0.00, 0.01, ..., 0.99.
    """
    check_speculative_model(model, draft_fn)
    if draft_fn is None and has_recurrent_draft_head(model):
        draft_fn = otter_recurrent_drafts(model)
    _check_cost("verification_cost", verification_cost)
    _check_cost("drafting_overhead", drafting_overhead)
    _check_cost("verification_fixed_cost", verification_fixed_cost)
    thresholds = sorted(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    if not thresholds or not all(isinstance(t, (int, float)) and 0.0 <= t < 1.0 for t in thresholds):
        raise ValueError(
            f"`thresholds` must be candidates in [0, 1) (1.0, never drafting, is always compared), got {thresholds!r}."
        )
    candidates = torch.tensor(thresholds, dtype=torch.float32)

    tokens, cost, steps, verified = torch.zeros(4, len(thresholds), dtype=torch.float64)
    bin_accepted = torch.zeros(CONFIDENCE_BINS)
    bin_total = torch.zeros(CONFIDENCE_BINS)
    for row in dataset:
        sequence = torch.tensor(row["input_ids"], dtype=torch.long)
        completion_mask = row.get("completion_mask") or [1] * len(sequence)
        positions = torch.tensor([t for t in range(len(sequence) - 1) if completion_mask[t + 1]], dtype=torch.long)
        if len(positions) == 0:
            continue
        drafts, confidences = _drafts_and_confidences(model, draft_fn, sequence[None].to(model.device), positions)
        drafts, confidences = drafts.cpu(), confidences.float().cpu()
        num_drafts = drafts.shape[1]

        # Draft k at position t is right when it is token t + k + 2; past the sequence's end there is nothing to
        # be right about. A chain is accepted up to its first wrong draft.
        offsets = positions[:, None] + 2 + torch.arange(num_drafts)
        targets = sequence[offsets.clamp(max=len(sequence) - 1)]
        right = (drafts == targets) & (offsets < len(sequence))
        right_chain = right.long().cumprod(-1)
        earlier_right = torch.cat([torch.ones_like(right_chain[:, :1]), right_chain[:, :-1]], dim=-1).bool()
        bins = (confidences[earlier_right] * CONFIDENCE_BINS).long().clamp(max=CONFIDENCE_BINS - 1)
        bin_total += torch.bincount(bins, minlength=CONFIDENCE_BINS)
        bin_accepted += torch.bincount(bins, weights=right[earlier_right].float(), minlength=CONFIDENCE_BINS)

        # For every candidate, the drafts each position's chain would verify (before the first unconfident one,
        # and no further than the sequence's end) and the tokens the step would add.
        confident_chain = (confidences[None] > candidates[:, None, None]).long().cumprod(-1).sum(-1)
        room = (len(sequence) - 2 - positions).clamp(min=0)
        chain = torch.minimum(confident_chain, room)
        step_tokens = 1 + torch.minimum(chain, right_chain.sum(-1))
        # Replay the loop: a step at position t moves on to t + tokens.
        is_step_position = torch.zeros(len(sequence), dtype=torch.bool)
        is_step_position[positions] = True
        index_of = torch.full((len(sequence),), -1, dtype=torch.long)
        index_of[positions] = torch.arange(len(positions))
        for candidate in range(len(thresholds)):
            position = int(positions[0])
            while position < len(sequence) - 1:
                if not is_step_position[position]:
                    position += 1
                    continue
                index = index_of[position]
                added, drafted = int(step_tokens[candidate, index]), int(chain[candidate, index])
                tokens[candidate] += added
                steps[candidate] += 1
                verified[candidate] += drafted
                verification = verification_fixed_cost + verification_cost * drafted if drafted else 0.0
                cost[candidate] += 1 + drafting_overhead + verification
                position += added

    if not steps.any():
        raise ValueError(
            "The dataset has no completion tokens to replay decoding on: give rows with `input_ids` and a "
            "`completion_mask` (as `build_self_distillation_dataset` writes them)."
        )
    speed_ups = tokens / cost
    # The best candidate; among equals, the highest threshold, which drafts least.
    best = max(range(len(thresholds)), key=lambda candidate: (float(speed_ups[candidate]), thresholds[candidate]))
    drafting_pays = float(speed_ups[best]) > 1.0
    return DraftConfidenceCalibration(
        threshold=float(thresholds[best]) if drafting_pays else 1.0,
        expected_speed_up=float(speed_ups[best]) if drafting_pays else 1.0,
        thresholds=[float(threshold) for threshold in thresholds],
        speed_ups=speed_ups.tolist(),
        accepted_tokens_per_step=(tokens / steps).tolist(),
        drafts_per_step=(verified / steps).tolist(),
        acceptance_by_confidence=[
            (edge / CONFIDENCE_BINS, float(accepted / total) if total else float("nan"), int(total))
            for edge, (accepted, total) in enumerate(zip(bin_accepted, bin_total))
        ],
    )
