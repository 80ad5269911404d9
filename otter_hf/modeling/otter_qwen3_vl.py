"""Otter for Qwen3-VL checkpoints: `Qwen3VLForConditionalGeneration` with parameters inserted into every layer of
its language model; the vision tower (and its deepstack mergers) untouched and frozen.

The language model is Qwen3's decoder (q/k norms on every head) with multimodal rotary positions: the rotary
embedding interleaves the temporal, height and width sections into one `cos, sin` pair per position before the
attention receives it, so the inserted heads rotate with the tables their layer's attention gets, as in Qwen3.
Deepstack adds visual features to the original stream after the first layers; the inserted stream reads the
original stream through the capture points, so it sees them.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3_vl.configuration_qwen3_vl import (
    Qwen3VLConfig,
    Qwen3VLTextConfig,
    Qwen3VLVisionConfig,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLTextModel,
    eager_attention_forward,
)

from .configuration_otter import OtterConfigMixin
from .inserted_stream import OtterLayout
from .modeling_otter import OtterModelMixin
from .vision_language import (
    OtterForConditionalGenerationMixin,
    OtterVisionLanguageConfigMixin,
    keep_base_checkpoint_layout,
    register_text_backbone,
)


@strict
class OtterQwen3VLTextConfig(OtterConfigMixin, Qwen3VLTextConfig):
    model_type = "otter_qwen3_vl_text"
    base_model_type = "qwen3_vl_text"


class OtterQwen3VLTextModel(OtterModelMixin, Qwen3VLTextModel):
    config_class = OtterQwen3VLTextConfig
    otter_layout = OtterLayout(
        eager_attention_fn=eager_attention_forward,
        query_key_norms=("q_norm", "k_norm"),
    )


register_text_backbone(OtterQwen3VLTextConfig, OtterQwen3VLTextModel)


@strict
class OtterQwen3VLConfig(OtterVisionLanguageConfigMixin, Qwen3VLConfig):
    model_type = "otter_qwen3_vl"
    base_model_type = "qwen3_vl"
    sub_configs = {"vision_config": Qwen3VLVisionConfig, "text_config": OtterQwen3VLTextConfig}
    sub_configs_defaults = sub_configs


keep_base_checkpoint_layout(OtterQwen3VLConfig)


class OtterQwen3VLForConditionalGeneration(OtterForConditionalGenerationMixin, Qwen3VLForConditionalGeneration):
    config_class = OtterQwen3VLConfig
    vision_language_model_class = Qwen3VLModel
    backbone_class = OtterQwen3VLTextModel


__all__ = [
    "OtterQwen3VLTextConfig",
    "OtterQwen3VLTextModel",
    "OtterQwen3VLConfig",
    "OtterQwen3VLForConditionalGeneration",
]
