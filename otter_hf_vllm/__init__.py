"""Otter models served by vLLM: the base model's own vLLM layers compute the original stream, the inserted stream
runs beside them, and one forward gives the original logits, the token-level reward logits and the value.

vLLM loads this package through two entry points declared in otter-hf's pyproject.toml:

- `vllm.general_plugins` -> `register`, which makes saved Otter checkpoints loadable: their configs (model types
  `otter_llama`, `otter_qwen2`, `otter_qwen3`) and their architectures (`architectures` in config.json);
- `vllm.logits_processors` -> `TokenRewardGuidanceLogitsProcessor`, which guides the requests that carry
  `token_reward_weight` in `SamplingParams.extra_args` (the server's `vllm_xargs`).

This package is separate from `otter_hf` on purpose: importing `otter_hf` loads its transformers modeling code,
which needs a newer transformers than vLLM pins. Nothing here imports `otter_hf`.
"""

# Architecture name in a saved Otter config.json -> the vLLM class serving it, loaded only when a model needs it.
OTTER_ARCHITECTURES = {
    "OtterLlamaForCausalLMWithValueHead": "otter_hf_vllm.llama:OtterLlamaForCausalLM",
    "OtterQwen2ForCausalLMWithValueHead": "otter_hf_vllm.qwen2:OtterQwen2ForCausalLM",
    "OtterQwen3ForCausalLMWithValueHead": "otter_hf_vllm.qwen3:OtterQwen3ForCausalLM",
}


def register() -> None:
    """Register the Otter configs with transformers' AutoConfig and the Otter architectures with vLLM.

    vLLM calls this in every process it starts, before it reads a model's config.
    """
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .configuration import OTTER_CONFIGS

    for config_class in OTTER_CONFIGS:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    supported = ModelRegistry.get_supported_archs()
    for architecture, model_class in OTTER_ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, model_class)


__all__ = ["OTTER_ARCHITECTURES", "register"]
