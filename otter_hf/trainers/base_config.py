"""The `TrainingArguments` options shared by the trainers whose loss reads an Otter model's outputs at every token."""

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class OtterTokenConfig(TrainingArguments):
    """The `TrainingArguments` options shared by the per-token Otter trainers (see their configs' docstrings)."""

    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    max_length: int | None = field(default=1024, metadata={"help": "Tokens kept per row."})
    disable_dropout: bool = field(default=True, metadata={"help": "Whether to disable dropout in the model."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used to tokenise the dataset."})
