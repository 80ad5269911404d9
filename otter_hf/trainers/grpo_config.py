"""Configuration of `OtterGRPOTrainer`: TRL's `GRPOConfig`, plus where the in-model reward comes from."""

from dataclasses import dataclass, field

from trl import GRPOConfig

from .reward_config import _bf16_available


@dataclass
class OtterGRPOConfig(GRPOConfig):
    r"""
    Configuration for [`OtterGRPOTrainer`]: every [`~trl.GRPOConfig`] option, plus:

    > The Otter reward

    otter_reward_path (`str` or `None`, *optional*, defaults to `None`):
        A folder (or Hub repository) written by `model.save_otter(...)`: inserted parameters trained as a reward on
        the policy's base. The trainer attaches them to the base model it is given, after checking that the base's
        weights are the ones they were trained on (the fingerprint `save_otter` records). Leave it unset when the
        model passed in is already an Otter model holding the reward.

    The Otter reward is the first reward of the run, logged as `rewards/otter_value/...`; the trainer's
    `reward_funcs` follow it. `reward_weights`, when given, has one weight per reward in that order (the Otter
    reward's first), as in TRL.

    > Defaults changed from TRL's

    bf16 (`bool`, *optional*):
        Whether to train in bf16 mixed precision. Defaults to `True` only where a CUDA device supports bf16 (TRL
        defaults to `True` everywhere, which fails on a CPU).
    disable_dropout (`bool`, *optional*, defaults to `True`):
        Whether to disable dropout in the model. On (TRL's default is off) so that the reward, read from the frozen
        base and value head, is the same number for the same completion.
    """

    otter_reward_path: str | None = field(
        default=None,
        metadata={"help": "A `save_otter` folder to attach to the base model as its reward; unset: the model's own."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; defaults to True only where a CUDA device supports bf16."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Whether to disable dropout in the model (the reward stays deterministic)."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = _bf16_available()
        super().__post_init__()
