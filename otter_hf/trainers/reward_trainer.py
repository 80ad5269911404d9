"""Reward modelling with Otter: TRL's `RewardTrainer`, training only the inserted parameters and the value head."""

from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import RewardConfig, RewardTrainer
from trl.data_utils import get_dataset_column_names

from ..modeling.modeling_otter import OtterForCausalLMMixin
from ..modeling.sequence_classification import sequence_classification_view
from .distributed import OtterTrainerMixin
from .safeguards import StopOnNonFiniteGradientCallback, check_dataset_not_empty, check_rows_kept, num_rows

PREFERENCE_COLUMNS_HELP = (
    "`chosen` and `rejected` (text, or lists of chat messages), optionally `prompt` (explicit prompt, same kind "
    "as `chosen`) and `margin` (a number); or already tokenized `chosen_ids` and `rejected_ids`"
)


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class OtterRewardConfig(RewardConfig):
    r"""
    Configuration for [`OtterRewardTrainer`]: every [`~trl.RewardConfig`] option, with three defaults changed.

    bf16 (`bool`, *optional*):
        Whether to train in bf16 mixed precision. Defaults to `True` only where a CUDA device supports bf16 (TRL
        defaults to `True` everywhere, which fails on a CPU). The base model's weights are never updated either way.
    train_sampling_strategy (`str`, *optional*, defaults to `"group_by_length"`):
        Batches pairs of similar length (by the longer of chosen and rejected), so a step does not pad every
        sequence to the longest dialogue in a random batch; on HH-RLHF that halves the tokens a step computes.
        `"random"` gives TRL's default order.
    activation_checkpointing (`bool`, *optional*, defaults to `False`):
        TRL turns it on by default (as `gradient_checkpointing`, the deprecated name, which still works). An Otter
        model's frozen base runs without autograd and keeps no activations; only the narrow inserted stream builds
        a graph, so there is nothing worth recomputing: off, a step costs about one base forward plus the inserted
        parameters' own work.
    """

    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; defaults to True only where a CUDA device supports bf16."},
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Sampler for training; 'group_by_length' batches pairs of similar length."},
    )
    # Unset rather than TRL's True: with `activation_checkpointing` unset too, transformers turns checkpointing off
    # without a deprecation warning, while a user's own `gradient_checkpointing=True` still applies.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated name of `activation_checkpointing`; both unset: off."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = _bf16_available()
        super().__post_init__()


def check_otter_model(model, trainer_name: str) -> None:
    if not isinstance(model, OtterForCausalLMMixin):
        raise TypeError(
            f"{trainer_name} trains the inserted parameters of an Otter model, but got a {type(model).__name__}. "
            "Build one with `otter_hf.insert(base_model)` or load a saved Otter checkpoint with "
            "`AutoModelForCausalLM.from_pretrained(path)` after `import otter_hf`."
        )


def check_preference_columns(
    dataset,
    dataset_name: str,
    tokenized_columns: tuple[set[str], ...] = ({"chosen_ids", "rejected_ids"}, {"chosen_input_ids", "rejected_input_ids"}),
    columns_help: str = PREFERENCE_COLUMNS_HELP,
) -> None:
    """Fail before any tokenisation when the columns do not make a preference dataset (or one of the
    `tokenized_columns` sets)."""
    columns = set(get_dataset_column_names(dataset))
    if any(tokenized <= columns for tokenized in tokenized_columns):
        return
    missing = sorted({"chosen", "rejected"} - columns)
    if missing:
        raise ValueError(
            f"The {dataset_name} dataset has no {', '.join(f'`{name}`' for name in missing)} column; a preference "
            f"dataset needs {columns_help}. Its columns are {sorted(columns)}."
        )
    example = next(iter(dataset))
    texts = {name: example[name] for name in ("prompt", "chosen", "rejected") if name in example}
    kinds = {name: "text" if isinstance(text, str) else "messages" if isinstance(text, list) else None for name, text in texts.items()}
    if None in kinds.values() or len(set(kinds.values())) > 1:
        found = ", ".join(f"`{name}`: {type(text).__name__}" for name, text in texts.items())
        raise ValueError(
            f"In the {dataset_name} dataset, `prompt`, `chosen` and `rejected` must all be text or all be lists of "
            f"chat messages; the first row has {found}."
        )
    if "margin" in example and not isinstance(example["margin"], (int, float)):
        raise ValueError(
            f"The `margin` column of the {dataset_name} dataset must hold numbers; the first row has "
            f"{type(example['margin']).__name__}."
        )


class OtterRewardTrainer(OtterTrainerMixin, RewardTrainer):
    """TRL's [`~trl.RewardTrainer`] for an Otter model: same datasets, loss and metrics, Otter parameters only.

    The reward of a sequence is the model's `value` at its last non-padding token. The trainer works on the
    model's sequence-classification view, which shares every parameter with the model passed in, so training
    updates that model in place. The base model stays frozen: only the inserted parameters and `v_head` train,
    and the original logits stay exactly the base model's.

    Args:
        model (`str` or Otter model):
            An Otter causal LM with value head (from `otter_hf.insert`, `otter_hf.load_otter` or
            `AutoModelForCausalLM`), its sequence-classification view, or the path of a saved Otter checkpoint.
        args ([`OtterRewardConfig`] or [`~trl.RewardConfig`], *optional*):
            Training configuration.
        **kwargs:
            The other arguments of [`~trl.RewardTrainer`] (`train_dataset`, `eval_dataset`, `processing_class`,
            callbacks, optimizers...). `peft_config` and `quantization_config` do not apply: the base is frozen
            and only Otter's own parameters train.
    """

    _tag_names = ["trl", "reward-trainer", "otter"]

    def __init__(self, model, args: RewardConfig | None = None, **kwargs):
        for option in ("peft_config", "quantization_config"):
            if kwargs.get(option) is not None:
                raise ValueError(
                    f"OtterRewardTrainer does not take `{option}`: the base model is frozen and only the inserted "
                    "parameters train."
                )
        if isinstance(model, str):
            model_init_kwargs = dict((args.model_init_kwargs if args is not None else None) or {})
            model = AutoModelForCausalLM.from_pretrained(model, **model_init_kwargs)
            if args is not None:
                args.model_init_kwargs = None  # used here; RewardTrainer would warn that a loaded model ignores them
        check_otter_model(model, type(self).__name__)
        if args is None:
            args = OtterRewardConfig(f"{(model.name_or_path or 'otter').rstrip('/').split('/')[-1]}-Reward")
        # The contract of this trainer, whatever was switched on before: the base never receives updates.
        self.prepare_trainable_parameters(model, args)
        # What `save_model` writes: the model passed in, normally the causal LM, which the view trained below shares
        # its parameters with (and not its config, which the Trainer sets to use_cache=False).
        self.otter_model = model
        super().__init__(model=sequence_classification_view(model), args=args, **kwargs)
        self.add_callback(StopOnNonFiniteGradientCallback)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Saved as the causal LM, the checkpoint names that class in `architectures` and keeps use_cache=True, so
        # `AutoModelForCausalLM.from_pretrained(...).generate()` decodes with a cache, as for any causal LM.
        trained, self.model = self.model, self.otter_model
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            self.model = trained

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        check_dataset_not_empty(dataset, dataset_name)
        check_preference_columns(dataset, dataset_name)
        num_rows_before = num_rows(dataset)
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        check_rows_kept(
            num_rows_before, dataset, dataset_name, args.max_length, "chosen or rejected longer than max_length tokens"
        )
        if isinstance(dataset, Dataset) and args.length_column_name not in dataset.column_names:
            dataset = dataset.map(
                lambda row: {args.length_column_name: max(len(row["chosen_ids"]), len(row["rejected_ids"]))}
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # The length-grouped sampler reads the length column after unused columns are removed.
        if self.args.length_column_name not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.args.length_column_name]
