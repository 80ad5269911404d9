"""Configuration of `OtterTokenRewardTrainer` (GenARM's loss on the token-level reward head)."""

from dataclasses import dataclass, field

from .base_config import OtterTokenConfig


@dataclass
class OtterTokenRewardConfig(OtterTokenConfig):
    r"""
    Configuration for [`OtterTokenRewardTrainer`]: every [`~transformers.TrainingArguments`] option, plus:

    beta (`float`, *optional*, defaults to `0.1`):
        GenARM's `beta`: the reward of an answer is `beta` times the sum of its tokens' log-probabilities under
        the reward policy. Guided decoding with `token_reward_weight = 1 / beta` samples from GenARM's
        KL-regularised optimum.
    max_length (`int` or `None`, *optional*, defaults to `1024`):
        Tokens kept per sequence (prompt and answer); the end of a longer answer is cut off, and a pair whose
        prompt alone fills `max_length` is dropped, as TRL's `DPOTrainer` does.
    train_sampling_strategy (`str`, *optional*, defaults to `"group_by_length"`):
        Batches pairs of similar length, so a step does not pad every sequence to the longest dialogue of a
        random batch.
    disable_dropout (`bool`, *optional*, defaults to `True`):
        Whether to disable dropout in the model.
    dataset_num_proc (`int`, *optional*):
        Processes used to tokenise the dataset.
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "The initial learning rate for AdamW."})
    beta: float = field(default=0.1, metadata={"help": "Reward scale: beta * sum of log pi_r over the answer."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Sampler for training; 'group_by_length' batches pairs of similar length."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"`beta` must be positive, got {self.beta!r}.")
