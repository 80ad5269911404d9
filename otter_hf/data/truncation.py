"""Fit long multi-turn preference pairs into a token budget by dropping their oldest turns.

TRL's reward trainer drops every pair longer than `max_length`. For multi-turn dialogues such as HH-RLHF that
throws away the pairs with the most context, and a larger `max_length` makes every step pay for the longest
dialogue in the batch. Dropping the oldest user/assistant exchanges of the shared prompt instead keeps each pair
(and the turns the answers respond to) within the budget.
"""

from datasets import Dataset


def _templated_length(tokenizer, messages) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def drop_oldest_turns(row: dict, tokenizer, max_length: int) -> dict | None:
    """A conversational preference row whose longer answer, with its prompt, fits in `max_length` tokens.

    Whole user/assistant exchanges are removed from the start of the prompt (after a system message, which
    stays) until it fits; the last user turn is always kept. Returns None when even that is too long.
    """
    prompt = list(row["prompt"])
    system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    turns = prompt[len(system) :]
    while True:
        candidate = system + turns
        longest = max(_templated_length(tokenizer, candidate + row[answer]) for answer in ("chosen", "rejected"))
        if longest <= max_length:
            return {**row, "prompt": candidate}
        if len(turns) <= 1:
            return None
        turns = turns[2:]  # one user turn and the assistant reply to it


def fit_preference_pairs(dataset: Dataset, tokenizer, max_length: int) -> tuple[Dataset, int]:
    """Apply `drop_oldest_turns` to every row; returns the fitted dataset and how many rows could not fit."""
    fitted = [drop_oldest_turns(row, tokenizer, max_length) for row in dataset]
    kept = [row for row in fitted if row is not None]
    return Dataset.from_list(kept), len(fitted) - len(kept)


__all__ = ["drop_oldest_turns", "fit_preference_pairs"]
