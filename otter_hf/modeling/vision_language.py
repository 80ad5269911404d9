"""What a vision-language architecture adds to an Otter text architecture: Otter in its language model only.

The base's `...ForConditionalGeneration` runs unchanged: its vision tower and projector encode the images, its
model merges the image features into the token embeddings and runs its language model on them, and its LM head
gives the original logits. The language model is the Otter backbone of the text family (its config's
`text_config` is the Otter text config, which the base model builds through `AutoModel`), so the inserted stream
runs beside the language model as in a text-only Otter model, starting from the merged embeddings as
`inputs_embeds` (see README.md, "Inputs embeddings"): from the tokens' inserted embeddings at text positions, from
the image features' first dimensions at image positions. The vision tower and projector hold no inserted parameter
and stay frozen; the inserted heads read the language model's final streams.

The insertion options (`inserted_hidden_size`, the heads, ...) live in the text config, where the inserted stream
is; the vision-language config reads them (and the language model's sizes) from there.
"""

import dataclasses
import inspect

from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_otter import OtterConfigMixin
from .inserted_heads import INSERTED_HEADS
from .modeling_otter import OtterForCausalLMMixin, _base_class_attribute, _contiguous_input

# The fields an Otter vision-language config reads from its text config: the insertion options and what the
# inserted heads, initialisation and checks read of the language model.
_OTTER_FIELDS = frozenset(field.name for field in dataclasses.fields(OtterConfigMixin))
_LANGUAGE_MODEL_FIELDS = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "initializer_range",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sliding_window",
        "max_position_embeddings",
        "attention_dropout",
    }
)


def register_text_backbone(config_class: type, backbone_class: type) -> None:
    """Let the base vision-language model build the Otter language model: it builds its language model with
    `AutoModel.from_config(config.text_config)`. Run where the architecture's module loads, also as remote code."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, backbone_class, exist_ok=True)


def keep_base_checkpoint_layout(config_class: type) -> None:
    """Save and load an Otter vision-language checkpoint with its base's renamings of module paths (Gemma 3 stores
    `language_model.model.*` for `model.language_model.*`), so the checkpoint holds the base's weights under the
    base's names. The renamings are anchored at the base's top-level modules, which no inserted name starts with."""
    mapping = get_checkpoint_conversion_mapping(config_class.base_model_type)
    if mapping:
        # Overwriting: the class is defined again when its file loads as a checkpoint's remote code.
        register_checkpoint_conversion_mapping(config_class.model_type, mapping, overwrite=True)


class OtterVisionLanguageConfigMixin:
    """An Otter vision-language config: the base's, with the Otter text config as `text_config`, reading the
    insertion options and the language model's sizes from it (and writing the insertion options to it)."""

    base_model_type: str

    def __getattr__(self, name):
        if name in _OTTER_FIELDS or name in _LANGUAGE_MODEL_FIELDS or name == "base_model_type_text":
            text_config = self.__dict__.get("text_config")
            if text_config is not None and not isinstance(text_config, dict):
                return getattr(text_config, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name, value):
        text_config = self.__dict__.get("text_config")
        if name in _OTTER_FIELDS and text_config is not None and not isinstance(text_config, dict):
            setattr(text_config, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_base_config(cls, base_config, **insertion_options):
        """The Otter config for a base vision-language model: every base setting kept, the insertion options added
        to the text config."""
        settings = base_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            settings.pop(key, None)
        text_settings = {key: value for key, value in settings["text_config"].items() if key != "model_type"}
        settings["text_config"] = cls.sub_configs["text_config"](**text_settings, **insertion_options)
        return cls(**settings)


class OtterForConditionalGenerationMixin(OtterForCausalLMMixin):
    """The Otter `...ForConditionalGeneration`: the base's vision-language model with the Otter language model,
    its LM head, and the inserted heads on the language model's final streams.

    The inherited machinery reaches the inserted stream through `otter_backbone`, the Otter language model here.
    """

    # The base's vision-language model class (vision tower, projector, language model); `backbone_class` is the
    # Otter language model.
    vision_language_model_class: type
    # transformers renames a vision-language checkpoint's weights as it loads them (Gemma 3's
    # `language_model.model.*`), so the inserted weights are checked after loading, by what it reports missing or
    # unexpected, rather than in the file's header beforehand.
    checkpoint_names_are_renamed = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The forward shows the base's signature (its image arguments, which generate() checks its keyword
        # arguments against) with the Otter requests added, and takes positional arguments in the base's order.
        base_signature = inspect.signature(_base_class_attribute(cls, "forward"))
        otter_forward = OtterForCausalLMMixin.forward
        requests = [
            parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for name, parameter in inspect.signature(otter_forward).parameters.items()
            if name.startswith("output_")
        ]
        base_parameters = list(base_signature.parameters.values())
        positional_names = [parameter.name for parameter in base_parameters[1:]]

        def forward(self, *args, **kwargs):
            kwargs.update(zip(positional_names, args))
            return otter_forward(self, **kwargs)

        forward.__signature__ = base_signature.replace(
            parameters=[*base_parameters[:-1], *requests, base_parameters[-1]]
        )
        forward.__doc__ = otter_forward.__doc__
        cls.forward = forward

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        text_config = config.text_config
        self.model = self.vision_language_model_class(config)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.lm_head.register_forward_pre_hook(_contiguous_input)
        for head in INSERTED_HEADS:
            setattr(self, head.attribute, head.module_class(text_config) if head.is_built(text_config) else None)
        self.post_init()
        self.freeze_base_parameters()

    @property
    def otter_backbone(self) -> nn.Module:
        """The Otter language model, where the inserted stream runs."""
        return self.model.language_model
