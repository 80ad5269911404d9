"""The configs of saved Otter checkpoints, as transformers releases that vLLM pins can read them.

A saved Otter config is the base architecture's config plus the insertion fields (see otter_hf's
`configuration_otter.py`). otter_hf's own config classes need a newer transformers than vLLM pins, so here each
model type gets the base config class under the Otter model type; the insertion fields load as attributes, and
`InsertionSizes` reads and checks them.
"""

from dataclasses import dataclass

from transformers import LlamaConfig, Qwen2Config, Qwen3Config


class OtterLlamaConfig(LlamaConfig):
    model_type = "otter_llama"


class OtterQwen2Config(Qwen2Config):
    model_type = "otter_qwen2"


class OtterQwen3Config(Qwen3Config):
    model_type = "otter_qwen3"


OTTER_CONFIGS = (OtterLlamaConfig, OtterQwen2Config, OtterQwen3Config)


@dataclass(frozen=True)
class InsertionSizes:
    """What was inserted next to the base model, as a saved Otter config records it."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    token_reward_head: bool

    @classmethod
    def from_config(cls, config) -> "InsertionSizes":
        fields = {
            "hidden_size": "inserted_hidden_size",
            "num_attention_heads": "inserted_num_attention_heads",
            "num_key_value_heads": "inserted_num_key_value_heads",
            "intermediate_size": "inserted_intermediate_size",
        }
        missing = [name for name in fields.values() if getattr(config, name, None) is None]
        if missing:
            raise ValueError(
                f"This config lacks the Otter insertion fields {missing}; serve a checkpoint written by an Otter "
                "model's `save_pretrained` (its config.json has them all)."
            )
        return cls(
            **{field: int(getattr(config, name)) for field, name in fields.items()},
            token_reward_head=bool(getattr(config, "token_reward_head", False)),
        )
