"""Otter for Granite checkpoints: `GraniteForCausalLM` with parameters inserted into every layer, and its
sequence-classification view.

What differs from Llama: four multipliers from the config. The base multiplies its token embeddings by
`embedding_multiplier` and every module's output by `residual_multiplier` before adding it to the residual stream;
the inserted stream does the same (layout data below), so copy-initialised dimensions keep following their
sources. `attention_multiplier` is the attention's scale, which the inserted heads take from the base attention as
on every architecture. The causal LM divides its logits by `logits_scaling`, which draft heads repeat.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.granite.configuration_granite import GraniteConfig
from transformers.models.granite.modeling_granite import (
    GraniteForCausalLM,
    GraniteModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout
from .modeling_otter import OtterForCausalLMMixin, OtterModelMixin
from .sequence_classification import OtterForSequenceClassificationMixin


@strict
class OtterGraniteConfig(OtterConfigMixin, GraniteConfig):
    model_type = "otter_granite"
    base_model_type = "granite"


class OtterGraniteModel(OtterModelMixin, GraniteModel):
    config_class = OtterGraniteConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        embedding_multiplier="embedding_multiplier",
        residual_multiplier="residual_multiplier",
    )


class OtterGraniteForCausalLMWithValueHead(OtterForCausalLMMixin, GraniteForCausalLM):
    config_class = OtterGraniteConfig
    backbone_class = OtterGraniteModel

    def process_logits(self, logits):
        # As GraniteForCausalLM.
        return logits / self.config.logits_scaling


class OtterGraniteForSequenceClassification(OtterForSequenceClassificationMixin, OtterGraniteForCausalLMWithValueHead):
    pass


__all__ = [
    "OtterGraniteConfig",
    "OtterGraniteModel",
    "OtterGraniteForCausalLMWithValueHead",
    "OtterGraniteForSequenceClassification",
]
