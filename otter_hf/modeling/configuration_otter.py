"""Configuration fields shared by every Otter architecture.

Each `OtterXConfig` is the base architecture's config plus these fields, so a saved Otter config still
describes the original model exactly and adds the sizes of what was inserted next to it.
"""

import dataclasses
from dataclasses import dataclass

import torch

from .inserted_heads import head_options

INIT_METHODS = ("copy", "normal", "random")
# Upper bounds that keep a crafted config from building (or allocating) a model far beyond its base: the inserted
# stream is a fraction of the original one, so these are generous.
MAX_INSERTED_SIZE_FACTOR = 4
MAX_INSERTED_HEADS = 1024
MAX_LAYERS = 1024

# `PreTrainedConfig` gives every config two placeholder labels unless told otherwise.
PLACEHOLDER_ID2LABEL = {0: "LABEL_0", 1: "LABEL_1"}
ONE_LABEL_ONLY = (
    "An Otter model scores with its single value head, so `num_labels` must be 1; got {num_labels}. Load it "
    "without `num_labels`, or with `num_labels=1`."
)


def attention_head_size(config) -> int:
    """The size of the base's attention heads: the first layer's where it varies by layer (Gemma 4's heads are
    larger in its global layers, and transformers refuses to read one size for all)."""
    if getattr(config, "is_heterogeneous", False):
        config = config.per_layer_config[0]
    # Qwen2 configs carry no `head_dim`; their heads split `hidden_size` evenly.
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# The config fields of the inserted heads, as declared in `INSERTED_HEADS`.
OtterHeadOptions = dataclasses.make_dataclass(
    "OtterHeadOptions",
    [(option.name, option.type, dataclasses.field(default=option.default)) for option in head_options()],
    kw_only=True,
)


@dataclass(kw_only=True)
class OtterConfigMixin(OtterHeadOptions):
    r"""
    inserted_hidden_size (`int`, *optional*):
        Width of the inserted stream that runs beside the original residual stream. Defaults to `head_dim`.
    inserted_num_attention_heads (`int`, *optional*, defaults to 1):
        Query heads inserted into every attention layer.
    inserted_num_key_value_heads (`int`, *optional*, defaults to 1):
        Key/value heads inserted into every attention layer; must divide `inserted_num_attention_heads`.
    inserted_intermediate_size (`int`, *optional*):
        FFN units inserted into every MLP. Defaults to `inserted_hidden_size`.
    inserted_init (`str`, *optional*, defaults to `"copy"`):
        How `otter_hf.insert` initialises the inserted parameters: `"copy"` starts them from original heads,
        units and embedding columns (the paper's best), `"normal"` draws N(0, initializer_range), `"random"`
        uses PyTorch's default layer initialisation.
    base_model_name_or_path (`str`, *optional*):
        The checkpoint the original parameters came from.
    base_model_fingerprint (`str`, *optional*):
        Digest of the original parameters, checked when inserted weights are attached to a base model.
    """

    inserted_hidden_size: int | None = None
    inserted_num_attention_heads: int = 1
    inserted_num_key_value_heads: int = 1
    inserted_intermediate_size: int | None = None
    inserted_init: str = "copy"
    base_model_name_or_path: str | None = None
    base_model_fingerprint: str | None = None

    def __post_init__(self, **kwargs):
        self._check_dtype()
        requested_labels = kwargs.get("num_labels")
        if requested_labels is not None and requested_labels != 1:
            raise ValueError(ONE_LABEL_ONLY.format(num_labels=requested_labels))
        super().__post_init__(**kwargs)
        # An Otter model scores with one value head: the two placeholder labels every config gets unless told
        # otherwise become one, so a later request for other labels stands out (the sequence-classification view
        # refuses it).
        if self.id2label == PLACEHOLDER_ID2LABEL:
            self.num_labels = 1
        if self.inserted_hidden_size is None:
            self.inserted_hidden_size = attention_head_size(self)
        if self.inserted_intermediate_size is None:
            self.inserted_intermediate_size = self.inserted_hidden_size
        self._check_insertion_sizes()

    def _check_dtype(self):
        # transformers resolves a string with getattr(torch, ...), which fails with an AttributeError on anything
        # but a dtype's name, and builds a model in any dtype it names.
        dtype = getattr(self, "dtype", None)
        resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if dtype is not None and not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
            raise ValueError(
                f'`dtype` must be a floating-point torch dtype such as "float32" or "bfloat16", got {dtype!r}: the '
                "config is damaged or was edited; correct its `dtype` or remove it."
            )

    def _check_insertion_sizes(self):
        # Raised here, at config construction, so impossible sizes fail before any weight is allocated.
        for name in (
            "inserted_hidden_size",
            "inserted_num_attention_heads",
            "inserted_num_key_value_heads",
            "inserted_intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.inserted_num_attention_heads % self.inserted_num_key_value_heads != 0:
            raise ValueError(
                f"`inserted_num_attention_heads` ({self.inserted_num_attention_heads}) must be a multiple of "
                f"`inserted_num_key_value_heads` ({self.inserted_num_key_value_heads}): each inserted key/value "
                "head serves a whole group of inserted query heads."
            )
        # A family with experts only (Qwen3.5-MoE) names no `intermediate_size`: its shared expert's is the size
        # copy-initialisation copies from.
        original_units = getattr(self, "intermediate_size", None) or self.shared_expert_intermediate_size
        if self.inserted_init not in INIT_METHODS:
            raise ValueError(f"`inserted_init` must be one of {INIT_METHODS}, got {self.inserted_init!r}.")
        if self.inserted_init == "copy":
            if self.inserted_hidden_size > self.hidden_size:
                raise ValueError(
                    f"inserted_init='copy' copies {self.inserted_hidden_size} of the {self.hidden_size} original "
                    "hidden dimensions; choose `inserted_hidden_size` <= `hidden_size` or inserted_init='normal'."
                )
            if self.inserted_intermediate_size > original_units:
                raise ValueError(
                    f"inserted_init='copy' copies {self.inserted_intermediate_size} of the {original_units} "
                    "original FFN units; choose `inserted_intermediate_size` <= `intermediate_size` or "
                    "inserted_init='normal'."
                )
        bounds = {
            "inserted_hidden_size": MAX_INSERTED_SIZE_FACTOR * self.hidden_size,
            "inserted_intermediate_size": MAX_INSERTED_SIZE_FACTOR * max(original_units, self.hidden_size),
            "inserted_num_attention_heads": MAX_INSERTED_HEADS,
            "inserted_num_key_value_heads": MAX_INSERTED_HEADS,
        }
        for name, bound in bounds.items():
            if getattr(self, name) > bound:
                raise ValueError(
                    f"`{name}` is {getattr(self, name)}, above its bound {bound} for this base model "
                    f"(hidden_size {self.hidden_size}): the config is damaged or crafted, or the sizes were mistyped."
                )
        if not isinstance(self.num_hidden_layers, int) or not 1 <= self.num_hidden_layers <= MAX_LAYERS:
            raise ValueError(
                f"`num_hidden_layers` must be an integer from 1 to {MAX_LAYERS}, got {self.num_hidden_layers!r}."
            )
        for option in head_options():
            value = getattr(self, option.name)
            if not option.is_valid(value):
                raise ValueError(f"`{option.name}` must be {option.requirement}, got {value!r}.")

    @classmethod
    def from_base_config(cls, base_config, **insertion_options):
        """The Otter config for a base model: every base setting kept, the insertion options added."""
        base_settings = base_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            base_settings.pop(key, None)
        return cls(**{**base_settings, **insertion_options})


# The heads' fields are documented where they are declared; the docstring lists them with the others.
OtterConfigMixin.__doc__ = OtterConfigMixin.__doc__.rstrip(" ") + "".join(
    f"    {option.name} (`{option.type.__name__}`, *optional*, defaults to {option.default!r}):\n"
    f"        {option.help}\n"
    for option in head_options()
)
