"""Otter for Qwen3 checkpoints in vLLM: vLLM's Qwen3 layers compute the original stream, the inserted stream runs
beside them (see `modeling.py`).

What differs from Llama: every query and key head is RMS-normalised (`q_norm`, `k_norm`) before the rotary
embedding; the inserted heads go through the same norms, as in otter_hf.
"""

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3Model

from .modeling import OtterDecoderLayerMixin, OtterForCausalLM, OtterModelMixin


def _normalize_heads(norm, states: torch.Tensor, head_dim: int) -> torch.Tensor:
    by_head = states.view(*states.shape[:-1], states.shape[-1] // head_dim, head_dim)
    return norm(by_head).view(states.shape)


class OtterQwen3DecoderLayer(OtterDecoderLayerMixin, Qwen3DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        self.add_inserted_modules(config, cache_config, prefix)

    def normalize_query_key(self, query, key):
        # As Qwen3Attention.forward: each head normalised on its own.
        attention = self.self_attn
        return (
            _normalize_heads(attention.q_norm, query, attention.head_dim),
            _normalize_heads(attention.k_norm, key, attention.head_dim),
        )


class OtterQwen3Model(OtterModelMixin, Qwen3Model):
    decoder_layer_type = OtterQwen3DecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.add_inserted_modules(vllm_config.model_config.hf_config)


class OtterQwen3ForCausalLM(OtterForCausalLM):
    model_class = OtterQwen3Model
