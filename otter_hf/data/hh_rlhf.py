"""Real human preferences: Anthropic's HH-RLHF dialogues as TRL conversational preference pairs.

HH-RLHF stores each pair as two whole dialogues, "\\n\\nHuman: ...\\n\\nAssistant: ...", that share every turn up to
the last assistant turn. `load_hh_rlhf` turns them into TRL's conversational `prompt` / `chosen` / `rejected`
rows: the shared turns are the prompt, the two last assistant turns are the answers.

otter_hf ships the harmless test split (1,812 pairs, MIT licensed, see `HH_RLHF_LICENSE` beside this file) as
`hh-harmless-dev.jsonl.gz`; `split_hh_rlhf` divides it, once and with a fixed seed, into the disjoint parts the
benchmarks and the demo use.
"""

import gzip
import json
import logging
import re
from collections import Counter
from pathlib import Path

from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

HH_RLHF_PATH = Path(__file__).with_name("hh-harmless-dev.jsonl.gz")

# Held-out pairs (accuracy and decoding prompts) and the gold judge's training pairs; the rest train the rewards
# that are evaluated or steer. Fixed, so every benchmark and the demo see the same disjoint parts.
HH_SPLIT_SEED = 0
HH_SPLIT_SIZES = {"test": 300, "gold_train": 700}

_TURN_PATTERN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class MalformedDialogue(ValueError):
    """An HH-RLHF row that does not make a preference pair; the message is the reason, used for counting."""


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """One "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue as chat messages, checked to alternate user/assistant."""
    pieces = _TURN_PATTERN.split(text)
    if pieces[0].strip():
        raise MalformedDialogue("text before the first turn")
    messages = [
        {"role": _ROLES[speaker], "content": content.strip()} for speaker, content in zip(pieces[1::2], pieces[2::2])
    ]
    if not messages:
        raise MalformedDialogue("no Human/Assistant turns")
    for index, message in enumerate(messages):
        if message["role"] != ("user" if index % 2 == 0 else "assistant"):
            raise MalformedDialogue("turns do not alternate Human/Assistant")
    return messages


def hh_pair_to_preference(chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    """One HH-RLHF pair as a conversational `prompt` / `chosen` / `rejected` row; MalformedDialogue if it is none."""
    chosen_messages, rejected_messages = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
    prompt = chosen_messages[:-1]
    if chosen_messages[-1]["role"] != "assistant" or rejected_messages[-1]["role"] != "assistant":
        raise MalformedDialogue("a dialogue does not end with an assistant turn")
    if rejected_messages[:-1] != prompt:
        raise MalformedDialogue("the dialogues differ before the last assistant turn")
    if not chosen_messages[-1]["content"] or not rejected_messages[-1]["content"]:
        raise MalformedDialogue("an empty answer")
    if chosen_messages[-1] == rejected_messages[-1]:
        raise MalformedDialogue("identical answers")
    return {"prompt": prompt, "chosen": [chosen_messages[-1]], "rejected": [rejected_messages[-1]]}


def hh_rows_to_preferences(rows) -> tuple[list[dict], Counter]:
    """Convert HH-RLHF rows (dicts with `chosen` and `rejected`), returning the pairs and a count of skip reasons."""
    pairs, skipped = [], Counter()
    for row in rows:
        try:
            pairs.append(hh_pair_to_preference(row["chosen"], row["rejected"]))
        except MalformedDialogue as reason:
            skipped[str(reason)] += 1
    return pairs, skipped


def load_hh_rlhf(path: str | Path = HH_RLHF_PATH) -> Dataset:
    """HH-RLHF pairs from a .jsonl or .jsonl.gz file as a TRL conversational preference dataset.

    Rows that do not make a pair (unparseable dialogues, different earlier turns, empty or identical answers) are
    skipped and counted in a warning, never silently.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No HH-RLHF file at {path}: pass the path of a .jsonl or .jsonl.gz file.")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    missing = [index for index, row in enumerate(rows) if not {"chosen", "rejected"} <= row.keys()]
    if missing:
        raise ValueError(
            f"{path}: row {missing[0] + 1} (and {len(missing) - 1} more) lacks `chosen`/`rejected`; HH-RLHF rows "
            f"hold the two whole dialogues under those keys. Row {missing[0] + 1} has {sorted(rows[missing[0]])}."
        )
    pairs, skipped = hh_rows_to_preferences(rows)
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
        logger.warning("Skipped %d of %d HH-RLHF rows in %s (%s).", sum(skipped.values()), len(rows), path, reasons)
    if not pairs:
        raise ValueError(f"{path} holds no usable HH-RLHF preference pair.")
    return Dataset.from_list(pairs)


def split_hh_rlhf(dataset: Dataset, sizes: dict[str, int] = HH_SPLIT_SIZES, seed: int = HH_SPLIT_SEED) -> DatasetDict:
    """Disjoint parts of a preference dataset: one per entry of `sizes` (in pairs), the rest as `reward_train`.

    The rows are shuffled once with `seed`, so the same file and sizes always give the same parts.
    """
    if sum(sizes.values()) >= len(dataset):
        raise ValueError(f"The parts {sizes} need more than the {len(dataset)} pairs available.")
    shuffled = dataset.shuffle(seed=seed)
    parts, start = {}, 0
    for name, size in sizes.items():
        parts[name] = shuffled.select(range(start, start + size))
        start += size
    parts["reward_train"] = shuffled.select(range(start, len(shuffled)))
    return DatasetDict(parts)


__all__ = [
    "HH_RLHF_PATH",
    "HH_SPLIT_SEED",
    "HH_SPLIT_SIZES",
    "MalformedDialogue",
    "hh_pair_to_preference",
    "hh_rows_to_preferences",
    "load_hh_rlhf",
    "parse_hh_dialogue",
    "split_hh_rlhf",
]
