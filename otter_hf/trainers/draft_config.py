"""Configuration of `OtterDraftTrainer` (Medusa-style and recurrent draft heads)."""

from dataclasses import dataclass, field

from .base_config import OtterTokenConfig


@dataclass
class OtterDraftConfig(OtterTokenConfig):
    r"""
    Configuration for [`OtterDraftTrainer`]: every [`~transformers.TrainingArguments`] option, plus:

    max_length (`int` or `None`, *optional*, defaults to `1024`):
        Tokens kept per row; the rest is cut off.
    disable_dropout (`bool`, *optional*, defaults to `True`):
        Whether to disable dropout in the model.
    dataset_num_proc (`int`, *optional*):
        Processes used to tokenise the dataset.
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "The initial learning rate for AdamW."})
