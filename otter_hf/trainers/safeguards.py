"""What every Otter trainer checks: training stops at the first non-finite gradient, and datasets that lose rows
to `max_length` say so."""

import torch
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the step that would have applied it was not taken."""


class StopOnNonFiniteGradientCallback(TrainerCallback):
    """Raise `TrainingDivergedError` before the optimizer applies a gradient holding NaN or infinity.

    A non-finite loss gives non-finite gradients, so this catches both, at the step they appear and before any
    weight is corrupted (the Trainer's `logging_nan_inf_filter` would otherwise hide the loss from the logs and
    every inserted weight would turn NaN). With fp16 loss scaling an infinite gradient is expected now and then:
    the scaler skips that step and lowers its scale, so the check is left to it.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad and parameter.grad is not None]
        if all(bool(torch.isfinite(parameter.grad).all()) for parameter in trainable):
            return
        raise TrainingDivergedError(
            f"Training diverged at step {state.global_step + 1}: the loss or the gradient of the inserted parameters "
            f"is NaN or infinite (learning rate {args.learning_rate:g}); that step was not applied. Train again with a "
            "lower learning rate, and check the labels for NaN or infinite values."
        )


def check_dataset_not_empty(dataset, dataset_name: str) -> None:
    if num_rows(dataset) == 0:
        raise ValueError(f"The {dataset_name} dataset is empty: give it at least one row.")


def check_rows_kept(num_rows_before: int | None, dataset, dataset_name: str, max_length: int | None, what_is_dropped: str) -> None:
    """Fail when no row of a dataset fits `max_length`, and warn with the count when some were dropped."""
    num_rows_after = num_rows(dataset)
    if num_rows_before is None or num_rows_after is None or num_rows_after == num_rows_before:
        return
    if num_rows_after == 0:
        raise ValueError(
            f"No row of the {dataset_name} dataset fits max_length={max_length}: all {num_rows_before} were dropped "
            f"({what_is_dropped}). Raise max_length or shorten the rows."
        )
    logger.warning(
        f"Dropped {num_rows_before - num_rows_after} of the {num_rows_before} rows of the {dataset_name} dataset "
        f"({what_is_dropped}); {num_rows_after} are kept. Raise max_length to keep them."
    )


def num_rows(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an IterableDataset: its rows are not counted ahead
        return None
