"""Training an Otter model's draft heads for speculative decoding (`otter_hf.generation.speculative_generate`).

Medusa-style heads (`model.draft_heads`): head k (0-based) at position t predicts the token at t + k + 2, k + 1
tokens past the one the LM head predicts; its loss is the cross-entropy against that token, and the loss is the
mean over heads. They read the inserted stream, which trains with them.

The recurrent draft head (`model.recurrent_draft_head`, EAGLE-style): from the final hidden state at t and the
token at t + 1 it predicts the hidden state at t + 1 and, through its LM head, the token at t + 2; a second step
reads its own prediction and the token at t + 2. Its loss is the cross-entropy of both steps over its draft
vocabulary (the second weighted by half), plus the smooth L1 distance of the first predicted hidden state to the
real one. It reads the original stream alone, so the forward runs without gradient and without the inserted
stream. Before training a head whose draft vocabulary was never fitted, the trainer fits it to the training
targets (`fit_draft_vocabulary`).

Only inserted parameters train: the base model, its LM head included, stays frozen, so the model's own greedy
output (what the drafts must match) never moves.

Dataset format, one of:

- `text`: plain text, tokenised with the processing class; every token is a target.
- `input_ids`: token ids, used as they are, with an optional `completion_mask` (1 where the token is a target,
  0 where it is only context, e.g. a prompt). `otter_hf.data.build_self_distillation_dataset` writes
  this format.

Drafts pay off when they match what the model itself generates, so the best training text is the model's own
greedy output (self-distillation, as in Medusa): `build_self_distillation_dataset(model, tokenizer, prompts)`.
"""

import collections
import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.data.data_collator import DataCollatorMixin
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import pad

from .base_trainer import OtterTokenTrainer
from .draft_config import OtterDraftConfig
from .utils import DRAFT_COLUMNS_HELP


def draft_head_loss(
    draft_hidden: torch.Tensor, lm_head: nn.Module, input_ids: torch.LongTensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over heads of each head's cross-entropy, and each head's top-1 accuracy.

    Args:
        draft_hidden: `(batch, seq, num_heads, hidden_size)`, the draft heads' hidden states at every position.
        lm_head: decodes a hidden state into logits (the frozen LM head).
        input_ids: `(batch, seq)`, the sequences; head k (0-based) at position t is scored on `input_ids[t + k + 2]`.
        target_mask: `(batch, seq)`, true where a token is a target (not padding, not context-only).

    The LM head runs only on the positions a head is scored at, which keeps the memory of a large vocabulary
    down to one head's targets at a time.
    """
    losses, accuracies = [], []
    for head in range(draft_hidden.shape[2]):
        shift = head + 2
        targets = input_ids[:, shift:]
        scored = target_mask[:, shift:].bool()
        logits = lm_head(draft_hidden[:, : targets.shape[1], head][scored]).float()
        if logits.shape[0] == 0:  # rows too short for this head: it contributes nothing
            losses.append(draft_hidden.sum() * 0.0)
            accuracies.append(torch.tensor(float("nan")))
            continue
        losses.append(nn.functional.cross_entropy(logits, targets[scored]))
        accuracies.append((logits.argmax(-1) == targets[scored]).float().mean().detach())
    return torch.stack(losses).mean(), torch.stack(accuracies)


# The recurrent head's loss weights: its teacher-forced step, then a step from its own predicted hidden state.
RECURRENT_STEP_WEIGHTS = (1.0, 0.5)
FEATURE_LOSS_WEIGHT = 1.0


def recurrent_draft_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    token_embeddings,
    input_ids: torch.LongTensor,
    target_mask: torch.Tensor,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent draft head's loss (see the module docstring) and each step's top-1 accuracy.

    Args:
        head: the `OtterRecurrentDraftHead`.
        hidden: `(batch, seq, hidden_size)`, final (post-norm) hidden states of the original stream.
        token_embeddings: token ids -> input embedding rows (`model.token_embeddings`).
        input_ids: `(batch, seq)`, the sequences.
        target_mask: `(batch, seq)`, true where a token is a target. A step is scored only where the tokens it
            reads and the one it predicts are all targets: at decoding time they are the model's own tokens.
        vocab_size: the model's vocabulary size.
    """
    to_draft_index = torch.full((vocab_size,), -1, dtype=torch.long, device=input_ids.device)
    to_draft_index[head.draft_token_ids] = torch.arange(head.draft_token_ids.shape[0], device=input_ids.device)
    target_mask = target_mask.bool()
    scored = target_mask[:, 1:]
    features = hidden
    loss = hidden.new_zeros(())
    accuracies = []
    for step, weight in enumerate(RECURRENT_STEP_WEIGHTS):
        shift = step + 2
        length = input_ids.shape[1] - shift
        if length <= 0:
            accuracies.append(torch.tensor(float("nan")))
            continue
        features = head.step(features[:, :length], token_embeddings(input_ids[:, shift - 1 : shift - 1 + length]))
        scored = scored[:, :length] & target_mask[:, shift:]
        if not scored.any():
            accuracies.append(torch.tensor(float("nan")))
            continue
        targets = input_ids[:, shift:][scored]
        logits = head.draft_logits(features[scored]).float()
        draft_targets = to_draft_index[targets]
        in_vocabulary = draft_targets >= 0
        if in_vocabulary.any():  # targets outside the draft vocabulary cannot be learnt, only missed
            loss = loss + weight * nn.functional.cross_entropy(logits[in_vocabulary], draft_targets[in_vocabulary])
        if step == 0:
            loss = loss + FEATURE_LOSS_WEIGHT * nn.functional.smooth_l1_loss(
                features[scored], hidden[:, 1 : 1 + length][scored]
            )
        drafts = head.draft_token_ids[logits.argmax(-1)]
        accuracies.append((drafts == targets).float().mean().detach())
    return loss, torch.stack(accuracies)


def fit_draft_vocabulary(model, dataset) -> None:
    """Give the recurrent draft head the `draft_vocab_size` tokens most frequent among the targets of `dataset`
    (rows with `input_ids` and an optional `completion_mask`), and its LM head the base LM head's rows for them.
    Tokens that never occur fill the rest in id order."""
    head = model.recurrent_draft_head
    counts = collections.Counter()
    for row in dataset:
        mask = row.get("completion_mask") or [1] * len(row["input_ids"])
        counts.update(token for token, is_target in zip(row["input_ids"], mask) if is_target)
    size = head.draft_token_ids.shape[0]
    chosen = [token for token, _ in counts.most_common(size)]
    chosen_set = set(chosen)
    chosen += [token for token in range(model.config.vocab_size) if token not in chosen_set][: size - len(chosen)]
    token_ids = torch.tensor(chosen, dtype=torch.long, device=head.draft_token_ids.device)
    with torch.no_grad():
        head.draft_token_ids.copy_(token_ids)
        head.lm_head.weight.copy_(model.lm_head.weight[token_ids].to(head.lm_head.weight.dtype))


@dataclass
class DataCollatorForDraftHeads(DataCollatorMixin):
    """Right-pads `input_ids` and builds the attention mask and the target mask (`completion_mask` on real tokens)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def padded(values, padding_value):
            tensors = [torch.tensor(value, dtype=torch.long) for value in values]
            return pad(
                tensors, padding_value=padding_value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
            )

        input_ids = padded([example["input_ids"] for example in examples], self.pad_token_id)
        attention_mask = padded([[1] * len(example["input_ids"]) for example in examples], 0)
        completion_masks = [example.get("completion_mask") or [1] * len(example["input_ids"]) for example in examples]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_mask": padded(completion_masks, 0) * attention_mask,
        }


class OtterDraftTrainer(OtterTokenTrainer):
    """Trains an Otter model's draft heads, and the inserted parameters they read, to predict future tokens.

    See the module docstring for the loss and the dataset format. Training and evaluation also log each head's
    top-1 accuracy as `draft_accuracy_head_{k}` (head k, from 0, predicts the token at t + k + 2), and the
    recurrent draft head's as `recurrent_draft_accuracy_step_{k}` (step k, from 0, predicts the token at t + k + 2).

    Args:
        model: an Otter causal LM with a recurrent draft head (`otter_hf.insert(base, num_recurrent_drafts=5)`),
            Medusa-style draft heads (`num_draft_heads=4`), or both.
        args ([`OtterDraftConfig`], *optional*): training configuration.
        train_dataset, eval_dataset: datasets with a `text` or an `input_ids` column (and optionally
            `completion_mask`); `eval_dataset` may be a dict of them.
        processing_class: the tokenizer; loaded from the model's name when not given.
        **kwargs: the other arguments of [`~transformers.Trainer`].
    """

    config_class = OtterDraftConfig
    data_collator_class = DataCollatorForDraftHeads
    run_name_suffix = "Draft"
    heads_in_loss = ("draft_heads", "recurrent_draft_head")
    heads_to_insert = (
        "draft heads to train: insert a recurrent draft head with `otter_hf.insert(base_model, "
        "num_recurrent_drafts=5)` or Medusa-style heads with `num_draft_heads=4`"
    )
    runs_heads_outside_forward = True

    def loss_reads_inserted_layers(self, model) -> bool:
        # The recurrent head reads the original stream alone; only Medusa-style heads read the inserted one.
        return model.draft_heads is not None

    def __init__(
        self,
        model,
        args: OtterDraftConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, data_collator, **kwargs)
        head = getattr(model, "recurrent_draft_head", None)
        if head is not None and not head.is_vocabulary_fitted():
            fit_draft_vocabulary(model, self.train_dataset)

    def _check_datasets(self, train_dataset, eval_dataset) -> None:
        datasets = {"train": train_dataset}
        if isinstance(eval_dataset, dict):
            datasets.update(eval_dataset)
        elif eval_dataset is not None:
            datasets["eval"] = eval_dataset
        for name, dataset in datasets.items():
            self._check_columns(dataset, name)

    @staticmethod
    def _check_columns(dataset, dataset_name: str) -> None:
        """Fail before any tokenisation or training when a dataset has neither accepted column."""
        columns = set(get_dataset_column_names(dataset))
        if not {"text", "input_ids"} & columns:
            raise ValueError(
                f"The {dataset_name} dataset has neither a `text` nor an `input_ids` column; OtterDraftTrainer "
                f"takes {DRAFT_COLUMNS_HELP}. Its columns are {sorted(columns)}."
            )

    @staticmethod
    def _prepare_dataset(dataset, processing_class, args: OtterDraftConfig, dataset_name: str):
        columns = set(get_dataset_column_names(dataset))
        if "input_ids" in columns:

            def truncate(example):
                kept = {"input_ids": example["input_ids"][: args.max_length]}
                if example.get("completion_mask") is not None:
                    kept["completion_mask"] = example["completion_mask"][: args.max_length]
                return kept

            return dataset.map(
                truncate,
                remove_columns=sorted(columns - {"input_ids", "completion_mask"}),
                num_proc=args.dataset_num_proc,
                desc=f"Truncating {dataset_name} dataset",
            )
        return dataset.map(
            lambda example: {"input_ids": processing_class(text=example["text"])["input_ids"][: args.max_length]},
            remove_columns=sorted(columns),
            num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {dataset_name} dataset",
        )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "completion_mask"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        otter = self.accelerator.unwrap_model(model)
        # Only Medusa-style heads read the inserted stream. Without it, no parameter of the forward is trainable, so
        # it builds no graph even with gradients on; and it must run with them on: DDP all-reduces a backward's
        # gradients only after a forward of the wrapped model that ran with gradients enabled.
        with contextlib.nullcontext() if otter.draft_heads is not None else otter.otter_disabled():
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
                output_hidden_states=True,
                logits_to_keep=1,
            )
        hidden = outputs.hidden_states[-1]
        mode = "train" if model.training else "eval"
        loss = hidden.new_zeros(())
        extra_outputs = {}
        if otter.draft_heads is not None:
            draft_hidden = otter.draft_heads(hidden, outputs.inserted_hidden_states[-1])
            head_loss, accuracies = draft_head_loss(
                draft_hidden, otter.lm_head, inputs["input_ids"], inputs["target_mask"]
            )
            loss = loss + head_loss
            self._log_accuracies(mode, "draft_accuracy_head", accuracies)
            extra_outputs["draft_hidden"] = draft_hidden
        if otter.recurrent_draft_head is not None:
            recurrent_loss, accuracies = recurrent_draft_loss(
                otter.recurrent_draft_head,
                hidden,
                otter.token_embeddings,
                inputs["input_ids"],
                inputs["target_mask"],
                otter.config.vocab_size,
            )
            loss = loss + recurrent_loss
            self._log_accuracies(mode, "recurrent_draft_accuracy_step", accuracies)
        return (loss, extra_outputs) if return_outputs else loss

    def _log_accuracies(self, mode: str, prefix: str, accuracies: torch.Tensor) -> None:
        for index, accuracy in enumerate(accuracies.tolist()):
            if accuracy == accuracy:  # not NaN: the batch had targets this far ahead
                self._metrics[mode][f"{prefix}_{index}"].append(accuracy)
