"""Configuration of `OtterValueTrainer` (prefix and step value regression)."""

from dataclasses import dataclass, field

from .base_config import OtterTokenConfig


@dataclass
class OtterValueConfig(OtterTokenConfig):
    r"""
    Configuration for [`OtterValueTrainer`]: every [`~transformers.TrainingArguments`] option, plus:

    max_length (`int` or `None`, *optional*, defaults to `1024`):
        Tokens kept per row (prompt and completion); the rest, and any label it held, is cut off.
    step_separator (`str`, *optional*, defaults to `"\n"`):
        Appended to every step of a step-labelled row; the value at its last token predicts the step's label.
    train_on_last_step_only (`bool`, *optional*, defaults to `False`):
        Regress only the last step of a step-labelled row.
    disable_dropout (`bool`, *optional*, defaults to `True`):
        Whether to disable dropout in the model.
    dataset_num_proc (`int`, *optional*):
        Processes used to tokenise the dataset.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "The initial learning rate for AdamW."})
    step_separator: str = field(default="\n", metadata={"help": "Appended to every step of a step-labelled row."})
    train_on_last_step_only: bool = field(default=False, metadata={"help": "Regress only the last step of a row."})
