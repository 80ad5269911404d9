"""Otter for Llama checkpoints in vLLM: vLLM's Llama layers compute the original stream, the inserted stream runs
beside them (see `modeling.py`)."""

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel

from .modeling import OtterDecoderLayerMixin, OtterForCausalLM, OtterModelMixin


class OtterLlamaDecoderLayer(OtterDecoderLayerMixin, LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.add_inserted_modules(vllm_config.model_config.hf_config, vllm_config.cache_config, prefix)


class OtterLlamaModel(OtterModelMixin, LlamaModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=OtterLlamaDecoderLayer)
        self.add_inserted_modules(vllm_config.model_config.hf_config)


class OtterLlamaForCausalLM(OtterForCausalLM):
    model_class = OtterLlamaModel
