"""Training the expert and anti-expert heads: DExperts' two fine-tuned language models inside the LLM's forward.

DExperts (Liu et al., ACL 2021) fine-tunes one copy of a language model on text with the attribute wanted (the
expert) and another on text with the attribute to avoid (the anti-expert). Here each is a head on the inserted
stream (`expert_head`, `anti_expert_head`, `otter_hf.insert(base, expert_heads=True)`), trained with the same
loss, the cross-entropy of the next token, on its own corpus; the inserted layers under them train on both. The
base model stays frozen.

Dataset formats (TRL's), one of:

- a preference dataset: `chosen` and `rejected` (text or chat messages), optionally `prompt`; the expert learns
  the chosen answers, the anti-expert the rejected ones (HH-RLHF, for instance: `otter_hf.data.load_hh_rlhf`);
- a language modelling dataset with a boolean `expert` column saying which head a row trains: `text` (or chat
  `messages`), or `prompt` and `completion`. `expert_corpora(expert_dataset, anti_expert_dataset)` builds one from
  two language modelling datasets.
"""

from dataclasses import dataclass
from typing import Any

import torch
from datasets import concatenate_datasets
from transformers.data.data_collator import DataCollatorMixin
from trl.data_utils import get_dataset_column_names, is_conversational, maybe_extract_prompt
from trl.trainer.dpo_trainer import common_prefix_length
from trl.trainer.utils import pad

from .base_trainer import OtterTokenTrainer
from .expert_config import OtterExpertConfig
from .token_reward_trainer import tokenize_preference_row
from .utils import check_preference_columns, check_rows_kept, num_rows

TOKENIZED_COLUMNS = {"input_ids", "completion_mask", "expert"}
LANGUAGE_MODELLING_COLUMNS = ({"text"}, {"messages"}, {"prompt", "completion"})
EXPERT_COLUMNS_HELP = (
    "`chosen` and `rejected` (a preference dataset: the expert learns `chosen`, the anti-expert `rejected`), "
    "optionally `prompt`; or a boolean `expert` column with `text`, `messages` or `prompt` and `completion` (build "
    "one from two text datasets with `otter_hf.trainers.expert_corpora`); or already tokenized `input_ids`, "
    "`completion_mask` and `expert`"
)


def expert_corpora(expert_dataset, anti_expert_dataset):
    """One dataset for `OtterExpertTrainer` from two language modelling datasets of the same format (`text`,
    `messages`, or `prompt` and `completion`): the rows of `expert_dataset` train the expert head, those of
    `anti_expert_dataset` the anti-expert head (an `expert` column says which)."""
    tagged = []
    for dataset, is_expert, name in ((expert_dataset, True, "expert"), (anti_expert_dataset, False, "anti-expert")):
        columns = set(get_dataset_column_names(dataset))
        if not any(needed <= columns for needed in LANGUAGE_MODELLING_COLUMNS):
            raise ValueError(
                f"The {name} dataset needs a `text` column (or `messages`, or `prompt` and `completion`), as TRL's "
                f"language modelling datasets have; its columns are {sorted(columns)}."
            )
        if "expert" in columns:
            raise ValueError(f"The {name} dataset already has an `expert` column; pass it as the training set.")
        tagged.append(dataset.map(lambda row, flag=is_expert: {"expert": flag}))
    if set(get_dataset_column_names(tagged[0])) != set(get_dataset_column_names(tagged[1])):
        raise ValueError(
            "The expert and anti-expert datasets must have the same columns, got "
            f"{sorted(get_dataset_column_names(expert_dataset))} and "
            f"{sorted(get_dataset_column_names(anti_expert_dataset))}."
        )
    return concatenate_datasets(tagged)


def _token_list(ids) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template; older versions a plain list.
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


def tokenize_language_modelling_row(example: dict, processing_class, completion_only_loss: bool) -> dict:
    """`input_ids` and `completion_mask` (1 where the loss reads a token) of one language modelling row."""
    eos = processing_class.eos_token
    if "prompt" not in example:
        if "messages" in example:
            input_ids = _token_list(processing_class.apply_chat_template(example["messages"]))
        else:
            text = example["text"]
            input_ids = processing_class(text=text + ("" if text.endswith(eos) else eos))["input_ids"]
        return {"input_ids": input_ids, "completion_mask": [1] * len(input_ids)}
    if is_conversational(example):
        prompt_ids = processing_class.apply_chat_template(example["prompt"], add_generation_prompt=True)
        full_ids = processing_class.apply_chat_template(example["prompt"] + example["completion"])
    else:
        completion = example["completion"]
        prompt_ids = processing_class(text=example["prompt"])["input_ids"]
        full_ids = processing_class(text=example["prompt"] + completion + ("" if completion.endswith(eos) else eos))[
            "input_ids"
        ]
    prompt_ids, full_ids = _token_list(prompt_ids), _token_list(full_ids)
    prompt_length = common_prefix_length(prompt_ids, full_ids) if completion_only_loss else 0
    return {"input_ids": full_ids, "completion_mask": [0] * prompt_length + [1] * (len(full_ids) - prompt_length)}


def _preference_pairs_to_rows(batch: dict, processing_class, completion_only_loss: bool) -> dict:
    """Each preference pair becomes two rows: prompt and chosen answer for the expert, prompt and rejected answer
    for the anti-expert."""
    rows = {"input_ids": [], "completion_mask": [], "expert": []}
    for index in range(len(batch["chosen"])):
        pair = tokenize_preference_row({key: values[index] for key, values in batch.items()}, processing_class)
        prompt_mask = [0 if completion_only_loss else 1] * len(pair["prompt_ids"])
        for answer, is_expert in (("chosen_ids", True), ("rejected_ids", False)):
            rows["input_ids"].append(pair["prompt_ids"] + pair[answer])
            rows["completion_mask"].append(prompt_mask + [1] * len(pair[answer]))
            rows["expert"].append(is_expert)
    return rows


@dataclass
class DataCollatorForExpertHeads(DataCollatorMixin):
    """Right-pads `input_ids` and `completion_mask`, builds the attention mask, and stacks `expert` (which head
    each row trains)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def padded(key, padding_value):
            tensors = [torch.tensor(example[key], dtype=torch.long) for example in examples]
            return pad(
                tensors, padding_value=padding_value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
            )

        input_ids = padded("input_ids", self.pad_token_id)
        attention_mask = padded("input_ids", -1) != -1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask.long(),
            "completion_mask": padded("completion_mask", 0),
            "expert": torch.tensor([bool(example["expert"]) for example in examples]),
        }


def expert_head_token_losses(model, input_ids, attention_mask, completion_mask, expert) -> torch.Tensor:
    """The cross-entropy of each next token under the head its row trains (the expert head where `expert`, the
    anti-expert head elsewhere), shape (batch, positions); 0 where `completion_mask` leaves a token out.

    The heads' logits are computed only from the position before the earliest completion token on, so a long
    prompt builds no (sequence x vocabulary) tensor.
    """
    first_completion = int(completion_mask[:, 1:].argmax(-1).min()) + 1
    logits_to_keep = input_ids.shape[1] - first_completion + 1
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        logits_to_keep=logits_to_keep,
        output_expert_logits=True,
        output_anti_expert_logits=True,
    )
    # Position t predicts token t + 1: the last kept position predicts nothing.
    logits = torch.where(expert[:, None, None], outputs.expert_logits[:, :-1], outputs.anti_expert_logits[:, :-1])
    targets = input_ids[:, first_completion:]
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return losses * completion_mask[:, first_completion:]


class OtterExpertTrainer(OtterTokenTrainer):
    """Trains an Otter model's expert and anti-expert heads (and the inserted parameters under them) with the
    language modelling loss, each on its own corpus; see the module docstring for the dataset formats.

    Args:
        model: an Otter causal LM with `expert_heads=True` (`otter_hf.insert(base, expert_heads=True)`).
        args ([`OtterExpertConfig`], *optional*): training configuration.
        train_dataset, eval_dataset: a preference dataset, or a language modelling dataset with an `expert` column
            (`expert_corpora`); `eval_dataset` may be a dict of them.
        processing_class: the tokenizer; loaded from the model's name when not given.
        **kwargs: the other arguments of [`~transformers.Trainer`].

    The loss is the mean cross-entropy over the batch's answer tokens; training and evaluation also log each
    head's own, `expert_loss` and `anti_expert_loss`.
    """

    config_class = OtterExpertConfig
    data_collator_class = DataCollatorForExpertHeads
    run_name_suffix = "Experts"
    heads_in_loss = ("expert_head", "anti_expert_head")
    heads_to_insert = "expert heads to train: build one with `otter_hf.insert(base, expert_heads=True)`"

    @staticmethod
    def _prepare_dataset(dataset, processing_class, args: OtterExpertConfig, dataset_name: str):
        columns = set(get_dataset_column_names(dataset))
        if columns >= TOKENIZED_COLUMNS:
            pass  # already tokenized
        elif "expert" in columns and any(needed <= columns for needed in LANGUAGE_MODELLING_COLUMNS):
            dataset = dataset.map(
                tokenize_language_modelling_row,
                fn_kwargs={"processing_class": processing_class, "completion_only_loss": args.completion_only_loss},
                remove_columns=sorted(columns - {"expert"}),
                num_proc=args.dataset_num_proc,
                desc=f"Tokenizing {dataset_name} dataset",
            )
        elif {"chosen", "rejected"} <= columns:
            check_preference_columns(dataset, dataset_name, tokenized_columns=(), columns_help=EXPERT_COLUMNS_HELP)
            dataset = dataset.map(maybe_extract_prompt, num_proc=args.dataset_num_proc)
            dataset = dataset.map(
                _preference_pairs_to_rows,
                batched=True,
                fn_kwargs={"processing_class": processing_class, "completion_only_loss": args.completion_only_loss},
                remove_columns=sorted(get_dataset_column_names(dataset)),
                num_proc=args.dataset_num_proc,
                desc=f"Tokenizing {dataset_name} dataset",
            )
        else:
            raise ValueError(
                f"The {dataset_name} dataset does not have the columns OtterExpertTrainer takes: "
                f"{EXPERT_COLUMNS_HELP}. Its columns are {sorted(columns)}."
            )
        if args.max_length is not None:
            dataset = dataset.map(
                lambda row: {key: row[key][: args.max_length] for key in ("input_ids", "completion_mask")}
            )
        # A row whose answer was cut off entirely (or that has none) leaves the loss nothing to learn from.
        num_rows_before = num_rows(dataset)
        dataset = dataset.filter(lambda row: any(row["completion_mask"][1:]))
        check_rows_kept(num_rows_before, dataset, dataset_name, args.max_length, "no answer token within max_length")
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = sorted(TOKENIZED_COLUMNS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        expert = inputs["expert"].bool()
        token_losses = expert_head_token_losses(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], expert
        )
        num_tokens = inputs["completion_mask"][:, 1:].sum(-1)
        loss = token_losses.sum() / num_tokens.sum()

        metrics = self._metrics["train" if model.training else "eval"]
        row_sums = token_losses.detach().sum(-1)
        # Every process gathers the same tensors, whichever heads its own rows train.
        totals = torch.stack(
            [row_sums[expert].sum(), num_tokens[expert].sum(), row_sums[~expert].sum(), num_tokens[~expert].sum()]
        ).float()
        totals = self.accelerator.gather_for_metrics(totals[None]).sum(0)
        for name, (loss_sum, count) in (("expert_loss", totals[:2]), ("anti_expert_loss", totals[2:])):
            if count > 0:
                metrics[name].append((loss_sum / count).item())
        return (loss, {"token_losses": token_losses}) if return_outputs else loss


__all__ = [
    "DataCollatorForExpertHeads",
    "OtterExpertTrainer",
    "expert_corpora",
    "expert_head_token_losses",
    "tokenize_language_modelling_row",
]
