"""Training data for Otter models: preference pairs for rewards (the small bundled set, real HH-RLHF pairs, fitting
pairs to a length) and self-distilled text for draft heads.

`preferences.jsonl` holds 345 conversational preference pairs (`prompt`, `chosen`, `rejected`, each a list of
chat messages) made from templates: a user asks for a review, about someone's day, how to answer a friend, or
for help, and the chosen answer is warm, positive and helpful while the rejected one is negative, rude or
dismissive. The 69 `test` pairs are about subjects (places, films, events, tasks) no `train` pair mentions.
Real human preferences come from `hh_rlhf` (Anthropic's HH-RLHF harmless pairs, shipped beside this file).
Draft heads train on the model's own continuations: `build_self_distillation_dataset`.
"""

from pathlib import Path

from datasets import Dataset

from .hh_rlhf import HH_RLHF_PATH, load_hh_rlhf, split_hh_rlhf
from .self_distillation import build_self_distillation_dataset
from .truncation import fit_preference_pairs

PREFERENCES_PATH = Path(__file__).with_name("preferences.jsonl")
SPLITS = ("train", "test")


def load_preference_dataset(split: str = "train") -> Dataset:
    """The bundled preference pairs of `split` ("train" or "test") in TRL's conversational preference format."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    dataset = Dataset.from_json(str(PREFERENCES_PATH), keep_in_memory=True)
    return dataset.filter(lambda row: row["split"] == split, keep_in_memory=True).remove_columns("split")


__all__ = [
    "HH_RLHF_PATH",
    "PREFERENCES_PATH",
    "build_self_distillation_dataset",
    "fit_preference_pairs",
    "load_hh_rlhf",
    "load_preference_dataset",
    "split_hh_rlhf",
]
