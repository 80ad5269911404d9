"""Otter for Qwen3 checkpoints in vLLM: vLLM's Qwen3 layers compute the original stream, the inserted stream runs
beside them (see `modeling.py`).

What differs from Llama: every query and key head is RMS-normalised (`q_norm`, `k_norm`) before the rotary
embedding; the inserted heads go through the same norms, as in otter_hf.
"""

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3Model

from .modeling import OtterDecoderLayerMixin, OtterForCausalLM, OtterModelMixin


class OtterQwen3DecoderLayer(OtterDecoderLayerMixin, Qwen3DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        self.add_inserted_modules(config, cache_config, prefix)

    def query_key_norms(self):
        # As Qwen3Attention.forward: each head normalised on its own.
        return self.self_attn.q_norm, self.self_attn.k_norm


class OtterQwen3Model(OtterModelMixin, Qwen3Model):
    decoder_layer_type = OtterQwen3DecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.add_inserted_modules(vllm_config.model_config.hf_config)


class OtterQwen3ForCausalLM(OtterForCausalLM):
    model_class = OtterQwen3Model
