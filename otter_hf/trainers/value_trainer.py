"""Prefix value regression with Otter: the value at every prefix regressed towards a label.

Two dataset formats:

- sequence labels, `prompt` (optional), `completion` and `label` (a number, or a bool read as 1.0/0.0), text or
  chat messages (this is TRL's unpaired preference format, so `trl.data_utils.unpair_preference_dataset` turns
  a preference dataset into one). The value at every completion prefix is regressed towards the label with the
  weighted cumulative squared loss of Reward-Augmented Decoding (Deng & Raffel, 2023): prefix `t` of `T`
  weighs `t / (1 + ... + T)`, so later prefixes, which know more of the sequence, count more.
- step labels in the old TRL PRM format, `prompt`, `completions` (the steps) and `labels` (one per step). Each
  step is followed by `step_separator` and the value at its last token is regressed towards the step's label,
  all labelled steps of a row weighing the same.

Every row's weights sum to one, and the loss of a batch is the mean over its rows of
`sum_t w_t (value_t - label)^2`.
"""

from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.data_utils import get_dataset_column_names, is_conversational, maybe_apply_chat_template
from trl.trainer.utils import pad

from ..modeling.sequence_classification import OtterForSequenceClassificationMixin
from .base_trainer import OtterTokenTrainer
from .utils import SEQUENCE_COLUMNS_HELP, STEP_COLUMNS_HELP, check_otter_model, check_rows_kept, num_rows
from .value_config import OtterValueConfig


def prefix_weights(length: int) -> list[float]:
    """Reward-Augmented Decoding's weights for the prefixes 1..length: linear in the prefix length, summing to one."""
    total = length * (length + 1) / 2
    return [position / total for position in range(1, length + 1)]


def _as_label(value: Any, where: str) -> float:
    if isinstance(value, (bool, int, float)):
        return float(value)
    raise ValueError(f"{where} must be a number or a bool, got {type(value).__name__} ({value!r}).")


def tokenize_sequence_row(example: dict, processing_class, max_length: int | None) -> dict:
    """One sequence-labelled row: the label at every completion token, weighted by prefix length."""
    label = _as_label(example["label"], "`label`")
    conversational = is_conversational(example)
    if conversational:
        # The chat template writes the special tokens itself.
        texts = maybe_apply_chat_template(example, processing_class)
        prompt, completion = texts.get("prompt", ""), texts["completion"]
    else:
        prompt, completion = example.get("prompt") or "", example["completion"] + processing_class.eos_token
    prompt_ids = processing_class(text=prompt, add_special_tokens=not conversational)["input_ids"] if prompt else []
    completion_ids = processing_class(text=completion, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    num_completion = max(0, len(input_ids) - len(prompt_ids))
    return {
        "input_ids": input_ids,
        "value_targets": [0.0] * (len(input_ids) - num_completion) + [label] * num_completion,
        "value_weights": [0.0] * (len(input_ids) - num_completion) + prefix_weights(num_completion),
    }


def tokenize_step_row(example: dict, processing_class, args: OtterValueConfig) -> dict:
    """One step-labelled row: each step's label at its last token (the end of its separator)."""
    completions, labels = example["completions"], example["labels"]
    if len(completions) != len(labels):
        raise ValueError(
            f"A step-labelled row needs one label per step; this row has {len(completions)} completions and "
            f"{len(labels)} labels (prompt: {example['prompt'][:60]!r})."
        )
    input_ids = processing_class(text=example["prompt"])["input_ids"]
    targets, weights = [0.0] * len(input_ids), [0.0] * len(input_ids)
    for index, (step, label) in enumerate(zip(completions, labels)):
        step_ids = processing_class(text=step + args.step_separator, add_special_tokens=False)["input_ids"]
        if not step_ids:
            continue
        labelled = not args.train_on_last_step_only or index == len(completions) - 1
        input_ids += step_ids
        targets += [0.0] * (len(step_ids) - 1) + [_as_label(label, "Each of `labels`")]
        weights += [0.0] * (len(step_ids) - 1) + [1.0 if labelled else 0.0]
    input_ids, targets, weights = input_ids[: args.max_length], targets[: args.max_length], weights[: args.max_length]
    total = sum(weights)
    return {
        "input_ids": input_ids,
        "value_targets": targets,
        "value_weights": [weight / total for weight in weights] if total else weights,
    }


@dataclass
class DataCollatorForValueRegression(DataCollatorMixin):
    """Right-pads `input_ids`, `value_targets` and `value_weights`, and builds the attention mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def padded(key, padding_value, dtype):
            tensors = [torch.tensor(example[key], dtype=dtype) for example in examples]
            return pad(
                tensors, padding_value=padding_value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
            )

        input_ids = padded("input_ids", self.pad_token_id, torch.long)
        attention_mask = pad(
            [torch.ones(len(example["input_ids"]), dtype=torch.long) for example in examples],
            padding_value=0,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "value_targets": padded("value_targets", 0.0, torch.float32),
            "value_weights": padded("value_weights", 0.0, torch.float32),
        }


class OtterValueTrainer(OtterTokenTrainer):
    """Trains an Otter model's value at every prefix (sequence labels) or at every step end (step labels).

    Only the inserted parameters and `v_head` train; the base model stays frozen. See the module docstring for
    the dataset formats and the loss.

    Args:
        model: an Otter causal LM with value head (`otter_hf.insert`, `otter_hf.load_otter`, `AutoModelForCausalLM`).
        args ([`OtterValueConfig`], *optional*): training configuration.
        train_dataset, eval_dataset: datasets in one of the two formats, or already tokenised (`input_ids`,
            `value_targets`, `value_weights`).
        processing_class: the tokenizer; loaded from the model's name when not given.
        **kwargs: the other arguments of [`~transformers.Trainer`].
    """

    config_class = OtterValueConfig
    data_collator_class = DataCollatorForValueRegression
    run_name_suffix = "Value"

    # compute_loss returns a per-row mean, which the Trainer must still divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model,
        args: OtterValueConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        check_otter_model(model, type(self).__name__)
        if isinstance(model, OtterForSequenceClassificationMixin):
            raise TypeError(
                "OtterValueTrainer regresses the value at every token, which the sequence-classification view pools "
                "away; pass the Otter causal LM (`AutoModelForCausalLM.from_pretrained`) instead."
            )
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, data_collator, **kwargs)

    @staticmethod
    def _prepare_dataset(dataset, processing_class, args: OtterValueConfig, dataset_name: str):
        columns = set(get_dataset_column_names(dataset))
        if {"input_ids", "value_targets", "value_weights"} <= columns:
            return dataset
        if {"completions", "labels"} & columns:
            missing = sorted({"prompt", "completions", "labels"} - columns)
            tokenize, fn_kwargs = tokenize_step_row, {"args": args}
            expected = STEP_COLUMNS_HELP
        else:
            missing = sorted({"completion", "label"} - columns)
            tokenize, fn_kwargs = tokenize_sequence_row, {"max_length": args.max_length}
            expected = SEQUENCE_COLUMNS_HELP
        if missing:
            raise ValueError(
                f"The {dataset_name} dataset has no {', '.join(f'`{name}`' for name in missing)} column. "
                f"OtterValueTrainer takes sequence labels ({SEQUENCE_COLUMNS_HELP}) or step labels "
                f"({STEP_COLUMNS_HELP}); for the columns it has, {sorted(columns)}, it expected {expected}."
            )
        dataset = dataset.map(
            tokenize,
            fn_kwargs={"processing_class": processing_class, **fn_kwargs},
            remove_columns=sorted(columns),
            num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {dataset_name} dataset",
        )
        # A row whose labelled tokens were all cut off by max_length has nothing left to learn from.
        num_rows_before = num_rows(dataset)
        dataset = dataset.filter(lambda row: any(row["value_weights"]), num_proc=args.dataset_num_proc)
        check_rows_kept(num_rows_before, dataset, dataset_name, args.max_length, "no labelled token within max_length")
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "value_targets", "value_weights"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, logits_to_keep=1
        )
        squared_error = (outputs.value - inputs["value_targets"]) ** 2
        loss = (inputs["value_weights"] * squared_error).sum() / inputs["input_ids"].shape[0]
        return (loss, {"value": outputs.value}) if return_outputs else loss
