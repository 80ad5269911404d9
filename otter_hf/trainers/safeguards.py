"""Every Otter trainer stops at the first non-finite gradient, before it corrupts the inserted weights."""

import torch
from transformers import TrainerCallback


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
        trainable = [
            parameter for parameter in model.parameters() if parameter.requires_grad and parameter.grad is not None
        ]
        if all(bool(torch.isfinite(parameter.grad).all()) for parameter in trainable):
            return
        raise TrainingDivergedError(
            f"Training diverged at step {state.global_step + 1}: the loss or the gradient of the inserted parameters "
            f"is NaN or infinite (learning rate {args.learning_rate:g}); that step was not applied. Train again with a "
            "lower learning rate, and check the labels for NaN or infinite values."
        )
