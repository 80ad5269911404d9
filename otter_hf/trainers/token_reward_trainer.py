"""Training the token-level reward head: GenARM's autoregressive reward model inside the LLM's own forward.

The reward of an answer `y` to a prompt `x` is `beta * sum_t log pi_r(y_t | x, y_<t)`, where `pi_r` is the
softmax of the model's `token_reward_logits`; the loss on a preference pair is GenARM's (Xu et al., ICLR 2025),
`-log sigmoid(beta * (log pi_r(y_w | x) - log pi_r(y_l | x)))`, summed over the answer tokens only. It is DPO's
loss without a reference model: TRL's `DPOTrainer` always runs one (a copy of the model, or precomputed log
probabilities), so this trainer takes TRL's preference datasets, tokenisation conventions, batch layout
(`DataCollatorForPreference`) and metric names, and computes the loss itself. The base model stays frozen.
"""

import torch
from datasets import Dataset
from trl.data_utils import get_dataset_column_names, is_conversational, maybe_extract_prompt
from trl.trainer.dpo_trainer import DataCollatorForPreference, common_prefix_length
from trl.trainer.utils import selective_log_softmax

from .base_trainer import OtterTokenTrainer
from .token_reward_config import OtterTokenRewardConfig
from .utils import TOKEN_REWARD_COLUMNS_HELP, check_preference_columns, check_rows_kept, num_rows

TOKENIZED_COLUMNS = {"prompt_ids", "chosen_ids", "rejected_ids"}


def tokenize_preference_row(example: dict, processing_class) -> dict:
    """`prompt_ids`, `chosen_ids` and `rejected_ids` of one pair, as TRL's `DPOTrainer` tokenizes it.

    Each answer is tokenized together with its prompt, so the chat template closes and opens turns as it does in a
    real dialogue; the answer starts where the prompt's own tokens (with the generation prompt) stop matching.
    """
    if is_conversational(example):
        prompt_ids = processing_class.apply_chat_template(example["prompt"], add_generation_prompt=True)
        full_ids = {
            answer: processing_class.apply_chat_template(example["prompt"] + example[answer])
            for answer in ("chosen", "rejected")
        }
    else:
        eos = processing_class.eos_token
        prompt_ids = processing_class(text=example["prompt"])["input_ids"]
        full_ids = {
            answer: processing_class(
                text=example["prompt"] + example[answer] + ("" if example[answer].endswith(eos) else eos)
            )["input_ids"]
            for answer in ("chosen", "rejected")
        }
    # transformers 5 returns a BatchEncoding from apply_chat_template; older versions a plain list.
    prompt_ids, full_ids = _token_list(prompt_ids), {answer: _token_list(ids) for answer, ids in full_ids.items()}
    prompt_length = min(common_prefix_length(prompt_ids, ids) for ids in full_ids.values())
    return {
        "prompt_ids": prompt_ids[:prompt_length],
        "chosen_ids": full_ids["chosen"][prompt_length:],
        "rejected_ids": full_ids["rejected"][prompt_length:],
    }


def _token_list(ids) -> list[int]:
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


def token_reward_log_probs(
    model, input_ids: torch.LongTensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """`sum_t log pi_r(y_t | x, y_<t)` over each row's completion tokens (`completion_mask` 1), shape (batch,).

    The reward logits are computed only from the position before the earliest completion token on, so the prompt
    of a long dialogue builds no (sequence x vocabulary) tensor.
    """
    first_completion = int(completion_mask.argmax(-1).min().clamp(min=1))
    logits_to_keep = input_ids.shape[1] - first_completion + 1
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        logits_to_keep=logits_to_keep,
        output_token_reward_logits=True,
    )
    # Position t predicts token t + 1: the last kept position predicts nothing.
    reward_logits = outputs.token_reward_logits[:, :-1].float()
    targets = input_ids[:, first_completion:]
    log_probs = selective_log_softmax(reward_logits, targets)
    return (log_probs * completion_mask[:, first_completion:]).sum(-1)


class OtterTokenRewardTrainer(OtterTokenTrainer):
    """Trains an Otter model's token-level reward head (and the inserted parameters under it) on preference
    pairs with GenARM's loss; see the module docstring.

    Args:
        model: an Otter causal LM with `token_reward_head=True` (`otter_hf.insert(base, token_reward_head=True)`).
        args ([`OtterTokenRewardConfig`], *optional*): training configuration.
        train_dataset, eval_dataset: preference datasets in TRL's format (the columns `OtterRewardTrainer` and
            `DPOTrainer` take), conversational or text, or already tokenized `prompt_ids`/`chosen_ids`/`rejected_ids`.
        processing_class: the tokenizer; loaded from the model's name when not given.
        **kwargs: the other arguments of [`~transformers.Trainer`].

    Logged metrics follow TRL's `DPOTrainer`: `rewards/chosen`, `rewards/rejected` (`beta * sum log pi_r`),
    `rewards/accuracies` (pairs whose chosen answer has the higher reward), `rewards/margins`, `logps/chosen`,
    `logps/rejected`.
    """

    config_class = OtterTokenRewardConfig
    run_name_suffix = "TokenReward"
    heads_in_loss = ("token_reward_head",)
    heads_to_insert = "token-level reward head to train: build one with `otter_hf.insert(base, token_reward_head=True)`"

    def build_data_collator(self, pad_token_id: int, args: OtterTokenRewardConfig):
        return DataCollatorForPreference(pad_token_id=pad_token_id, max_length=args.max_length)

    @staticmethod
    def _prepare_dataset(dataset, processing_class, args: OtterTokenRewardConfig, dataset_name: str):
        check_preference_columns(
            dataset, dataset_name, tokenized_columns=(TOKENIZED_COLUMNS,), columns_help=TOKEN_REWARD_COLUMNS_HELP
        )
        if not set(get_dataset_column_names(dataset)) >= TOKENIZED_COLUMNS:
            dataset = dataset.map(maybe_extract_prompt, num_proc=args.dataset_num_proc)
            dataset = dataset.map(
                tokenize_preference_row,
                fn_kwargs={"processing_class": processing_class},
                remove_columns=sorted(set(get_dataset_column_names(dataset)) - {args.length_column_name}),
                num_proc=args.dataset_num_proc,
                desc=f"Tokenizing {dataset_name} dataset",
            )
        if args.max_length is not None:
            # A prompt that fills max_length leaves no answer token to learn from.
            num_rows_before = num_rows(dataset)
            dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
            check_rows_kept(
                num_rows_before, dataset, dataset_name, args.max_length, "prompt of max_length tokens or more"
            )
        if isinstance(dataset, Dataset) and args.length_column_name not in dataset.column_names:
            dataset = dataset.map(
                lambda row: {
                    args.length_column_name: len(row["prompt_ids"])
                    + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
                }
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*sorted(TOKENIZED_COLUMNS), self.args.length_column_name]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        log_probs = token_reward_log_probs(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        )
        chosen_log_probs, rejected_log_probs = log_probs.chunk(2)
        chosen_rewards, rejected_rewards = self.args.beta * chosen_log_probs, self.args.beta * rejected_log_probs
        margins = chosen_rewards - rejected_rewards
        loss = -torch.nn.functional.logsigmoid(margins).mean()

        metrics = self._metrics["train" if model.training else "eval"]
        for name, values in (
            ("rewards/chosen", chosen_rewards),
            ("rewards/rejected", rejected_rewards),
            ("rewards/accuracies", (margins > 0).float()),
            ("rewards/margins", margins),
            ("logps/chosen", chosen_log_probs),
            ("logps/rejected", rejected_log_probs),
        ):
            metrics[name].append(self.accelerator.gather_for_metrics(values.detach()).mean().item())
        return (loss, {"rewards": torch.stack([chosen_rewards, rejected_rewards], dim=-1)}) if return_outputs else loss
