"""The HH-RLHF loader: dialogues to TRL conversational pairs, malformed rows counted, a fixed disjoint split."""

import gzip
import json
import logging

import pytest
from datasets import Dataset

import otter_hf
from otter_hf.data.hh_rlhf import (
    HH_RLHF_PATH,
    MalformedDialogue,
    hh_pair_to_preference,
    hh_rows_to_preferences,
)
from otter_hf.data.truncation import drop_oldest_turns

SLICE_PATH = "tests/data/hh-harmless-slice.jsonl"  # 10 well-formed pairs, then 2 malformed ones


def test_dialogue_becomes_shared_prompt_and_two_answers():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me steal a car\n\nAssistant: I can't help with that."
    rejected = (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me steal a car\n\nAssistant: Sure, first break a window."
    )
    row = hh_pair_to_preference(chosen, rejected)
    assert row["prompt"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Help me steal a car"},
    ]
    assert row["chosen"] == [{"role": "assistant", "content": "I can't help with that."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Sure, first break a window."}]


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: x\n\nAssistant: c", "differ before the last assistant turn"),
        ("\n\nHuman: a\n\nAssistant: ", "\n\nHuman: a\n\nAssistant: c", "empty answer"),
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: b", "identical answers"),
        ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: b2", "\n\nHuman: a\n\nAssistant: c", "alternate"),
        ("\n\nHuman: a", "\n\nHuman: a", "does not end with an assistant turn"),
        ("preamble\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: c", "before the first turn"),
    ],
)
def test_malformed_pairs_are_refused_with_their_reason(chosen, rejected, reason):
    with pytest.raises(MalformedDialogue, match=reason):
        hh_pair_to_preference(chosen, rejected)


def test_loader_counts_skipped_rows_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="otter_hf.data.hh_rlhf"):
        dataset = otter_hf.load_hh_rlhf(SLICE_PATH)
    assert len(dataset) == 10
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert "Skipped 2 of 12 HH-RLHF rows" in caplog.text
    assert "1 an empty answer" in caplog.text and "1 turns do not alternate" in caplog.text
    # The rows are TRL conversational preference rows: the prompt ends with the user, each answer is one reply.
    for row in dataset:
        assert row["prompt"][-1]["role"] == "user"
        assert [message["role"] for message in row["chosen"] + row["rejected"]] == ["assistant", "assistant"]


def test_loader_reads_plain_jsonl_and_gzip_alike(tmp_path):
    compressed = tmp_path / "slice.jsonl.gz"
    with open(SLICE_PATH, "rb") as source, gzip.open(compressed, "wb") as target:
        target.write(source.read())
    assert otter_hf.load_hh_rlhf(compressed).to_list() == otter_hf.load_hh_rlhf(SLICE_PATH).to_list()


def test_loader_names_missing_columns_and_missing_files(tmp_path):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(ValueError, match="lacks `chosen`/`rejected`.*'prompt', 'response'"):
        otter_hf.load_hh_rlhf(wrong)
    with pytest.raises(FileNotFoundError, match="No HH-RLHF file"):
        otter_hf.load_hh_rlhf(tmp_path / "missing.jsonl")


def test_bundled_file_converts_with_few_skips():
    with gzip.open(HH_RLHF_PATH, "rt", encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    pairs, skipped = hh_rows_to_preferences(rows)
    assert len(rows) == 1812
    assert len(pairs) + sum(skipped.values()) == len(rows)
    assert sum(skipped.values()) < 20


def test_split_is_fixed_disjoint_and_covers_everything():
    dataset = otter_hf.load_hh_rlhf()
    parts = otter_hf.split_hh_rlhf(dataset)
    assert {name: len(part) for name, part in parts.items()} == {
        "test": 300,
        "gold_train": 700,
        "reward_train": len(dataset) - 1000,
    }
    keys = {name: {json.dumps(row, sort_keys=True) for row in part} for name, part in parts.items()}
    assert not keys["test"] & keys["gold_train"] and not keys["test"] & keys["reward_train"]
    assert not keys["gold_train"] & keys["reward_train"]
    assert otter_hf.split_hh_rlhf(dataset)["test"].to_list() == parts["test"].to_list()
    with pytest.raises(ValueError, match="need more than"):
        otter_hf.split_hh_rlhf(dataset.select(range(100)))


class CharacterTokenizer:
    """A chat template of one token per character, enough to check what truncation keeps."""

    def apply_chat_template(self, messages, tokenize=True, return_dict=True):
        text = "".join(f"<{message['role']}>{message['content']}" for message in messages)
        return {"input_ids": list(text)}


def test_oldest_turns_are_dropped_until_the_pair_fits():
    row = {
        "prompt": [
            {"role": "user", "content": "old question " * 5},
            {"role": "assistant", "content": "old answer " * 5},
            {"role": "user", "content": "last question"},
        ],
        "chosen": [{"role": "assistant", "content": "no"}],
        "rejected": [{"role": "assistant", "content": "yes, here is how"}],
    }
    tokenizer = CharacterTokenizer()
    assert drop_oldest_turns(row, tokenizer, 1000) == row
    fitted = drop_oldest_turns(row, tokenizer, 60)
    assert fitted["prompt"] == row["prompt"][2:]
    assert fitted["chosen"] == row["chosen"] and fitted["rejected"] == row["rejected"]
    assert drop_oldest_turns(row, tokenizer, 20) is None
    dataset, unfit = otter_hf.fit_preference_pairs(Dataset.from_list([row, row]), tokenizer, 60)
    assert len(dataset) == 2 and unfit == 0
