"""Configuration of `OtterExpertTrainer` (DExperts-style expert and anti-expert heads)."""

from dataclasses import dataclass, field

from .base_config import OtterTokenConfig


@dataclass
class OtterExpertConfig(OtterTokenConfig):
    r"""
    Configuration for [`OtterExpertTrainer`]: every [`~transformers.TrainingArguments`] option, plus:

    completion_only_loss (`bool`, *optional*, defaults to `True`):
        For rows with a prompt (preference pairs, `prompt`/`completion` rows), compute the language modelling loss
        on the answer tokens only, as TRL's `SFTTrainer` does; the prompt is context. `False` trains on every token.
    max_length (`int` or `None`, *optional*, defaults to `1024`):
        Tokens kept per row (prompt and answer); the end of a longer row is cut off, and a row whose prompt alone
        fills `max_length` is dropped.
    disable_dropout (`bool`, *optional*, defaults to `True`):
        Whether to disable dropout in the model.
    dataset_num_proc (`int`, *optional*):
        Processes used to tokenise the dataset.
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "The initial learning rate for AdamW."})
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Train on the answer tokens only where a row has a prompt."}
    )
