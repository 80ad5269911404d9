"""Reward modelling with Otter: TRL's `RewardTrainer`, training only the inserted parameters and the value head."""

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import RewardConfig, RewardTrainer

from ..modeling import sequence_classification_view
from .distributed import OtterTrainerMixin
from .reward_config import OtterRewardConfig
from .safeguards import StopOnNonFiniteGradientCallback
from .utils import check_dataset_not_empty, check_otter_model, check_preference_columns, check_rows_kept, num_rows


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
