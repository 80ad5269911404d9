"""Otter for Qwen2 checkpoints in vLLM: vLLM's Qwen2 layers compute the original stream, the inserted stream runs
beside them (see `modeling.py`)."""

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2Model

from .modeling import OtterDecoderLayerMixin, OtterForCausalLM, OtterModelMixin


class OtterQwen2DecoderLayer(OtterDecoderLayerMixin, Qwen2DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        if self.self_attn.qk_norm:
            raise ValueError("Otter serves Qwen2 checkpoints without q/k norms (`qk_norm`), as otter_hf builds them.")
        self.add_inserted_modules(config, cache_config, prefix)


class OtterQwen2Model(OtterModelMixin, Qwen2Model):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=OtterQwen2DecoderLayer)
        self.add_inserted_modules(vllm_config.model_config.hf_config)


class OtterQwen2ForCausalLM(OtterForCausalLM):
    model_class = OtterQwen2Model
