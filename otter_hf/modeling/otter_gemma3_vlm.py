"""Otter for Gemma 3 checkpoints with images: `Gemma3ForConditionalGeneration` with parameters inserted into every
layer of its language model, the Gemma 3 text decoder (`otter_gemma3.py`); the SigLIP vision tower and the
multimodal projector untouched and frozen.

The base attends bidirectionally among the tokens of one image (a mask built from `token_type_ids`); the inserted
heads take the mask their layer's attention receives, so they attend alike.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.gemma3.configuration_gemma3 import Gemma3Config
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForConditionalGeneration, Gemma3Model
from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

from .otter_gemma3 import OtterGemma3TextConfig, OtterGemma3TextModel
from .vision_language import (
    OtterForConditionalGenerationMixin,
    OtterVisionLanguageConfigMixin,
    keep_base_checkpoint_layout,
    register_text_backbone,
)

register_text_backbone(OtterGemma3TextConfig, OtterGemma3TextModel)


@strict
class OtterGemma3Config(OtterVisionLanguageConfigMixin, Gemma3Config):
    model_type = "otter_gemma3"
    base_model_type = "gemma3"
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": OtterGemma3TextConfig}
    sub_configs_defaults = sub_configs


keep_base_checkpoint_layout(OtterGemma3Config)


class OtterGemma3ForConditionalGeneration(OtterForConditionalGenerationMixin, Gemma3ForConditionalGeneration):
    config_class = OtterGemma3Config
    vision_language_model_class = Gemma3Model
    backbone_class = OtterGemma3TextModel


__all__ = ["OtterGemma3Config", "OtterGemma3ForConditionalGeneration"]
