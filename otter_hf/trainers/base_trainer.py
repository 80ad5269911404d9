"""The set-up shared by the trainers whose loss reads an Otter model's outputs at every token (value, draft)."""

from collections import defaultdict

from transformers import AutoTokenizer, Trainer
from trl.trainer.utils import disable_dropout_in_model

from ..modeling.sequence_classification import OtterForSequenceClassificationMixin
from .distributed import OtterTrainerMixin
from .safeguards import StopOnNonFiniteGradientCallback
from .utils import check_dataset_not_empty, check_otter_model


class OtterTokenTrainer(OtterTrainerMixin, Trainer):
    """A `Trainer` for an Otter causal LM: base frozen, datasets prepared by `_prepare_dataset`, loss from
    `compute_loss` with no `labels` input.

    Subclasses set `config_class` (an `OtterTokenConfig`), `data_collator_class`
    (built from the tokenizer's pad token id by `build_data_collator`), `run_name_suffix` (for the default
    output folder) and `heads_to_insert` (what the model needs, for the error when it lacks every head in
    `heads_in_loss`), and define `_prepare_dataset(dataset, processing_class, args, dataset_name)`.
    """

    config_class: type
    data_collator_class: type
    run_name_suffix: str
    heads_to_insert: str

    def __init__(
        self,
        model,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        self._check_model(model)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        self._check_datasets(train_dataset, eval_dataset)
        run_name = (model.name_or_path or "otter").rstrip("/").split("/")[-1]
        args = args or self.config_class(f"{run_name}-{self.run_name_suffix}")
        self.prepare_trainable_parameters(model, args)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.name_or_path)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if data_collator is None:
            data_collator = self.build_data_collator(processing_class.pad_token_id, args)

        train_dataset = self._check_and_prepare_dataset(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                name: self._check_and_prepare_dataset(dataset, processing_class, args, name)
                for name, dataset in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._check_and_prepare_dataset(eval_dataset, processing_class, args, "eval")

        use_cache = model.config.use_cache
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The Trainer writes `args.use_cache` (False) into the model's config, and so into every checkpoint it
        # saves; the losses pass use_cache=False themselves, so the causal LM keeps its own setting.
        model.config.use_cache = use_cache
        # Evaluation computes the loss through compute_loss, with no `labels` input.
        self.can_return_loss = True
        self.label_names = []
        # Batch metrics appended by compute_loss, averaged into the next log line (as TRL's trainers do).
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.add_callback(StopOnNonFiniteGradientCallback)

    def _check_model(self, model) -> None:
        trainer_name = type(self).__name__
        check_otter_model(model, trainer_name)
        # The view returns the pooled value alone, none of the per-token outputs these losses read.
        if isinstance(model, OtterForSequenceClassificationMixin):
            raise ValueError(
                f"{trainer_name} trains heads of an Otter causal LM, not of its sequence-classification view; pass "
                "the causal LM (`AutoModelForCausalLM.from_pretrained`)."
            )
        if all(getattr(model, head, None) is None for head in self.heads_in_loss):
            raise ValueError(f"This Otter model has no {self.heads_to_insert}.")

    def _check_datasets(self, train_dataset, eval_dataset) -> None:
        """Checks a subclass makes on the datasets before any of them is prepared."""

    def _check_and_prepare_dataset(self, dataset, processing_class, args, dataset_name: str):
        check_dataset_not_empty(dataset, dataset_name)
        return self._prepare_dataset(dataset, processing_class, args, dataset_name)

    def build_data_collator(self, pad_token_id: int, args):
        return self.data_collator_class(pad_token_id=pad_token_id)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
