"""Turning a base causal LM into an Otter model, and attaching saved inserted weights to a base model."""

import contextlib
import copy
import dataclasses
import difflib
import itertools
import json
import os
import warnings

import torch
from accelerate import dispatch_model, init_empty_weights
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..modeling import OTTER_CLASSES_BY_BASE_MODEL_TYPE, SUPPORTED_BASE_MODEL_TYPES
from ..modeling.configuration_otter import OtterConfigMixin
from ..modeling.derived_layout import LayoutNotDerived, derived_architecture, derived_class_names, describe_layout
from ..modeling.initialization import initialize_inserted_parameters
from ..modeling.persistence import OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME, base_weights_fingerprint, reading_checkpoint
from ..modeling.quantization import (
    check_supported_quantization,
    quantization_method,
    with_inserted_modules_skipped,
)
from ..modeling.verification import check_inserted_state_dict, check_weights_in_memory, verify_inserted_weights
from ..modeling.vision_language import OtterVisionLanguageConfigMixin
from .hub import otter_files
from .layout_probe import check_probe_forward

INSERTION_OPTIONS = frozenset(
    field.name for field in dataclasses.fields(OtterConfigMixin) if not field.name.startswith("base_model_")
)
# Sizes that must agree between a base model and inserted weights made for another copy of it.
ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def _architecture_size(config, key: str):
    """The config's `key`, or its value per layer where it differs by layer (Gemma 4's key/value heads: transformers
    refuses to read one value for all layers of a config whose `per_layer_config` differs)."""
    try:
        return getattr(config, key, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return tuple(getattr(layer, key, None) for layer in config.per_layer_config)


def otter_class_for(base: PreTrainedModel) -> type[PreTrainedModel]:
    """The Otter class for `base` (a causal LM, or a vision-language `...ForConditionalGeneration`): its
    architecture's registered one, else one with the layout derived from the base's module names once a probe forward
    shows it fits (`derived_otter_class`)."""
    model_type = getattr(base.config, "model_type", None)
    if isinstance(base.config, (OtterConfigMixin, OtterVisionLanguageConfigMixin)):
        raise ValueError(
            f"This model already is an Otter model ({model_type!r}, inserted into "
            f"{base.config.base_model_name_or_path or 'its base model'}); Otter parameters are inserted once. Train "
            "or use it as it is, or insert into its base model."
        )
    if model_type in OTTER_CLASSES_BY_BASE_MODEL_TYPE:
        return OTTER_CLASSES_BY_BASE_MODEL_TYPE[model_type]
    return derived_otter_class(base)


def derived_otter_class(base: PreTrainedModel) -> type[PreTrainedModel]:
    """The Otter causal LM whose layout is derived from `base`'s module names (`derived_layout.py`), after a probe
    forward on `base` shows it fits (`layout_probe.py`); warns naming it. A ValueError names the capture point where
    the layout and the base part."""
    model_type = base.config.model_type
    refusal = (
        f"Otter does not support the {model_type!r} architecture yet; supported base architectures: "
        f"{', '.join(SUPPORTED_BASE_MODEL_TYPES)}."
    )
    if derived_class_names(model_type) is None:
        raise ValueError(f"{refusal} transformers has no causal LM class for it to derive an Otter layout from.")
    otter_class = derived_architecture(model_type)[2]
    if type(base) is not otter_class.derived_from:
        raise ValueError(
            f"{refusal} A layout is derived for transformers' own {otter_class.derived_from.__name__}; this base is a "
            f"{type(base).__name__}."
        )
    try:
        try:
            config = otter_class.config_class.from_base_config(base.config)
        except (AttributeError, TypeError) as error:  # a config without the sizes an Otter config reads
            raise LayoutNotDerived("config", str(error)) from None
        try:
            probe = _build_from_base(otter_class, config, base)
            initialize_inserted_parameters(probe, "copy")
        except LayoutNotDerived:
            raise
        except (RuntimeError, ValueError) as error:  # the base's weights do not take the derived layout's shapes
            raise LayoutNotDerived("build", f"{type(error).__name__}: {error}") from None
        check_probe_forward(probe, base)
    except LayoutNotDerived as error:
        raise ValueError(
            f"{refusal} The layout derived from its module names does not fit it at {error}. See "
            "otter_hf/modeling/README.md to add the architecture."
        ) from None
    warnings.warn(
        f"No Otter architecture is registered for {model_type!r}: using {otter_class.__name__}, whose layout is "
        f"derived from the base's module names ({describe_layout(probe.base_model.otter_layout)}). A probe forward "
        "showed the original logits bit-identical, every capture point firing and the copy-initialised inserted "
        "stream following the dimensions it copies. Its checkpoints load with otter_hf installed or with "
        "trust_remote_code=True.",
        stacklevel=3,
    )
    return otter_class


def check_model_path(path) -> None:
    """Fail at once on a model path that is no local folder and cannot be a Hub id, rather than after the Hub's
    retries."""
    path = os.fspath(path)
    if os.path.exists(path):
        return
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"No model at {path}: there is no such folder, and it is not a Hub model id.") from None


def _check_loading_options(options: dict) -> None:
    # Loading options are any `from_pretrained` keyword (config overrides included), so only names that look like
    # a misspelt insertion option can be caught; the model's __init__ would otherwise reject them obscurely.
    known = sorted(INSERTION_OPTIONS | {"init"})
    for name in options:
        if name in known:  # reached from load_otter only: insert() takes these out before loading
            raise TypeError(f"{name!r} cannot be passed here: the saved inserted weights fix it.")
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close or name.startswith("inserted_"):
            suggestion = f"; did you mean {close[0]!r}?" if close else "."
            raise TypeError(f"Unknown insertion option {name!r}{suggestion} The insertion options are {known}.")


def _load_base(base, load_options: dict) -> PreTrainedModel:
    if isinstance(base, (str, os.PathLike)):
        check_model_path(base)
        _check_loading_options(load_options)
        return AutoModelForCausalLM.from_pretrained(base, **load_options)
    if load_options:
        raise TypeError(
            f"Unexpected options {sorted(load_options)}: only insertion options {sorted(INSERTION_OPTIONS)} apply "
            "to a model object; loading options apply when the base is given as a model id or path."
        )
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"`base` must be a transformers causal LM or a model id/path, got {type(base).__name__}.")
    return base


def insert(base, *, init: str | None = None, **options) -> PreTrainedModel:
    """Insert trainable Otter parameters into every layer of a frozen base causal LM.

    Args:
        base: a loaded causal LM of a supported architecture (its `config.model_type` in
            `otter_hf.modeling.SUPPORTED_BASE_MODEL_TYPES`), or a model id or path to load with
            `AutoModelForCausalLM.from_pretrained`.
        init (`str`, *optional*): how the inserted parameters start, `"copy"` (default), `"normal"` or
            `"random"`; stored as the config's `inserted_init`.
        **options: insertion options (`inserted_hidden_size`, `inserted_num_attention_heads`,
            `inserted_num_key_value_heads`, `inserted_intermediate_size`, and the options of the inserted heads
            such as `value_head_dropout` and `num_draft_heads`); anything else goes to `from_pretrained` when
            `base` is an id or path.

    The returned model takes over the base model's weight tensors without copying them, freezes them, and
    leaves only the inserted parameters trainable. Its `logits` are exactly the base model's.
    """
    insertion_options = {key: options.pop(key) for key in list(options) if key in INSERTION_OPTIONS}
    if init is not None:
        if "inserted_init" in insertion_options:
            raise TypeError("Pass the initialisation once: `init` or `inserted_init`, not both.")
        insertion_options["inserted_init"] = init
    base = _load_base(base, options)
    check_weights_in_memory(base, "insert Otter parameters into this base model")
    otter_class = otter_class_for(base)
    check_supported_quantization(getattr(base.config, "quantization_config", None))
    config = otter_class.config_class.from_base_config(
        base.config, base_model_name_or_path=base.name_or_path or None, **insertion_options
    )
    model = _build_from_base(otter_class, config, base)
    initialize_inserted_parameters(model, config.inserted_init)
    model.config.base_model_fingerprint = model.base_weights_fingerprint()
    return model


def load_otter(base, otter_directory, *, skip_base_fingerprint_check: bool = False, **load_options) -> PreTrainedModel:
    """Attach inserted weights written by `model.save_otter(otter_directory)` to a base model.

    `otter_directory` is a local folder or a Hub repository id (e.g. one uploaded with
    `otter_hf.push_to_hub(model, repo_id, otter_only=True)`). `base` is a loaded base model or a model id or
    path; None loads the base model the inserted weights name.

    The base must be the model the weights were trained on: its architecture, sizes and weights (by the
    fingerprint the save records) are checked, and any mismatch raises a ValueError naming it. A save without a
    fingerprint is refused unless `skip_base_fingerprint_check=True`, which attaches the weights to any base of
    the same sizes, unchecked. The inserted weights themselves must be exactly the ones the model needs, of the
    right shapes, and finite; see `otter_hf.modeling.verification.check_inserted_state_dict`.
    """
    hub_options = {key: load_options[key] for key in ("token", "cache_dir", "local_files_only") if key in load_options}
    otter_directory = otter_files(otter_directory, **hub_options)
    config_path = os.path.join(otter_directory, OTTER_CONFIG_NAME)
    weights_path = os.path.join(otter_directory, OTTER_WEIGHTS_NAME)
    # Both files read at once, under the folder's shared lock, so that they come from the same save.
    with reading_checkpoint(otter_directory):
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise ValueError(
                f"{otter_directory} holds no complete Otter save: expected {OTTER_CONFIG_NAME} and "
                f"{OTTER_WEIGHTS_NAME} as written by `model.save_otter(directory)`."
            )
        saved = _read_otter_config(config_path)
        inserted_weights = load_file(weights_path)
    expected_fingerprint = saved.get("base_model_fingerprint")
    if not expected_fingerprint and not skip_base_fingerprint_check:
        raise ValueError(
            f"{os.path.join(otter_directory, OTTER_CONFIG_NAME)} records no `base_model_fingerprint`, so nothing "
            "shows which base weights these inserted weights were trained on. Save them again with `save_otter`, "
            "or pass `skip_base_fingerprint_check=True` to attach them to any base of the same sizes, unchecked."
        )
    if base is None:
        base = saved.get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"The inserted weights in {otter_directory} name no base model; pass the base model as `base`."
            )
    saved_quantization = saved.get("quantization_config")
    if saved_quantization is not None and isinstance(base, (str, os.PathLike)):
        # The base quantized as it was when the inserted weights were trained (from weights of the same dtype),
        # unless the caller says otherwise.
        load_options.setdefault("quantization_config", saved_quantization)
        if saved.get("dtype") is not None:
            load_options.setdefault("dtype", saved["dtype"])
    base = _load_base(base, load_options)
    check_weights_in_memory(base, "attach Otter parameters to this base model")
    otter_class = otter_class_for(base)
    base_quantization = getattr(base.config, "quantization_config", None)
    check_supported_quantization(base_quantization)
    config_class = otter_class.config_class
    if saved.get("model_type") != config_class.model_type:
        raise ValueError(
            f"These inserted weights were made for a {saved.get('model_type')!r} model, but the base is a "
            f"{base.config.model_type!r} model (it would need {config_class.model_type!r})."
        )
    # Both read through the Otter config class, which knows each architecture's names for them (GPT-2's `n_embd`).
    saved_config, base_config = config_class.from_dict(saved), config_class.from_base_config(base.config)
    mismatched = {
        key: (_architecture_size(saved_config, key), _architecture_size(base_config, key))
        for key in ARCHITECTURE_KEYS
        if _architecture_size(saved_config, key) != _architecture_size(base_config, key)
    }
    if mismatched:
        details = ", ".join(f"{key}: saved {ours} vs base {theirs}" for key, (ours, theirs) in mismatched.items())
        raise ValueError(
            f"The base model's sizes differ from the ones these inserted weights were made for ({details})."
        )
    if expected_fingerprint and base_weights_fingerprint(base.named_parameters(), base) != expected_fingerprint:
        raise ValueError(
            "The base model's weights differ from the ones these inserted weights were trained on (fingerprint "
            f"mismatch; they were made for {saved.get('base_model_name_or_path') or 'another checkpoint'}"
            f"{_quantization_hint(saved_quantization, base_quantization)}). Load the matching base checkpoint."
        )

    insertion_options = {key: saved[key] for key in INSERTION_OPTIONS if key in saved}
    config = config_class.from_base_config(
        base.config,
        base_model_name_or_path=saved.get("base_model_name_or_path"),
        base_model_fingerprint=expected_fingerprint,
        **insertion_options,
    )
    # The same check as `from_pretrained`'s, before the inserted parameters are allocated.
    verify_inserted_weights(otter_class, config, inserted_weights, weights_path)
    model = _build_from_base(otter_class, config, base)
    _load_inserted_weights(model, inserted_weights, source=weights_path)
    return model


def _quantization_hint(saved, loaded) -> str:
    """Why a fingerprint differs when the base is quantized otherwise than the one the weights were trained on:
    a quantized weight counts with its dequantized values."""
    saved_method, loaded_method = quantization_method(saved), quantization_method(loaded)
    if saved_method == loaded_method:
        return ""
    trained_on = f"quantized with {saved_method}" if saved_method else "unquantized"
    given = f"quantized with {loaded_method}" if loaded_method else "unquantized"
    return (
        f", {trained_on}, and this base is {given}: load it as they were trained on (pass the base's path and "
        "load_otter quantizes it as recorded), or pass `skip_base_fingerprint_check=True` to run them on this base "
        "unchecked"
    )


def _read_otter_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
    except (ValueError, RecursionError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({type(error).__name__}); save the inserted weights again."
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(
            f"{path} holds a JSON {type(saved).__name__}, not the object of config fields `save_otter` writes; save "
            "the inserted weights again."
        )
    return saved


def _build_from_base(otter_class, config, base) -> PreTrainedModel:
    """An Otter model holding `base`'s own weight tensors, its inserted parameters allocated but not initialised."""
    # Only the inserted parameters get fresh memory: the original ones are created on the meta device and
    # then replaced by the base tensors themselves.
    placement = InsertedPlacement(base)
    with _naming_allocation_failures(config, base.device):
        with init_empty_weights(include_buffers=False):
            model = otter_class._from_config(
                config, attn_implementation=base.config._attn_implementation, dtype=base.dtype
            )
        adopted = _adopt_replaced_modules(model, base)
        missing, unexpected = model.load_state_dict(_state_outside(base, adopted), strict=False, assign=True)
        if unexpected:
            raise ValueError(f"The base model has parameters an Otter model does not expect: {sorted(unexpected)[:5]}")
        # The base's non-persistent buffers too (rotary frequencies), as they are: a base cast with `.to(dtype)`
        # keeps them in that dtype, where a model built in that dtype keeps them in float32, and rounds positions so.
        for name, buffer in base.named_buffers():
            module_name, _, buffer_name = name.rpartition(".")
            non_persistent = base.get_submodule(module_name)._non_persistent_buffers_set
            model.get_submodule(module_name).register_buffer(
                buffer_name, buffer, persistent=buffer_name not in non_persistent
            )
        for module_name, module in model.named_modules():
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.is_meta:
                    in_fp32 = module_name.split(".")[0] in model._keep_in_fp32_modules_strict
                    dtype = torch.float32 if in_fp32 else base.dtype
                    device = placement.device_for(f"{module_name}.{name}" if module_name else name)
                    setattr(module, name, nn.Parameter(torch.empty(parameter.shape, device=device, dtype=dtype)))
    if adopted:
        model.otter_backbone.register_capture_hooks()
    model.tie_weights()
    placement.dispatch(model)
    model.freeze_base_parameters()
    model.train(base.training)
    model.generation_config = copy.deepcopy(base.generation_config)
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        # Saved whole, the model then reloads quantized as it is: the base quantized, the inserted modules not.
        model.hf_quantizer = quantizer
        model.config.quantization_config = with_inserted_modules_skipped(quantizer.quantization_config, model)
    return model


class InsertedPlacement:
    """Where each inserted parameter of an Otter model built from `base` lives: on the device of the base module it
    is attached to (a decoder layer's inserted heads and units on that layer's device, an inserted norm weight on its
    norm's), and the inserted heads beside the LM head, whose device reads the final streams. A base split over
    several devices by a `device_map` gives an Otter model split the same way."""

    def __init__(self, base: PreTrainedModel):
        self.device_map = getattr(base, "hf_device_map", None)
        self.module_devices = {}
        for module_name, module in base.named_modules():
            tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
            if tensor is not None:
                self.module_devices[module_name] = tensor.device
        output_embeddings = base.get_output_embeddings()
        self.head_device = output_embeddings.weight.device if output_embeddings is not None else base.device

    def device_for(self, parameter_name: str) -> torch.device:
        """The device of the closest base module above `parameter_name` (the root itself aside: the inserted heads
        hang there)."""
        module_name = parameter_name
        while "." in module_name:
            module_name = module_name.rpartition(".")[0]
            if module_name in self.module_devices:
                return self.module_devices[module_name]
        return self.head_device

    def dispatch(self, model: PreTrainedModel) -> None:
        """Give `model` the hooks that move activations between the devices of a base split by a `device_map` (the
        base's own hooks stay on the base modules, which the Otter model does not reuse)."""
        if not self.device_map or len(set(self.device_map.values())) < 2:
            return
        heads = {
            name: self.head_device
            for name, module in model.named_children()
            if name != model.base_model_prefix
            and name not in self.device_map
            and any(True for _ in module.parameters())
        }
        dispatch_model(model, device_map={**self.device_map, **heads})


def _state_outside(base, adopted: list[str]) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers of `base` outside the `adopted` modules, as `base.state_dict()` names
    them. Read from the modules rather than by `state_dict()`, which repacks the weights of a bitsandbytes 4-bit
    layer that has run on the CPU (its outputs change after it)."""
    state = {}
    for module_name, module in base.named_modules(remove_duplicate=False):
        if any(module_name == name or module_name.startswith(f"{name}.") for name in adopted):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, parameter in module._parameters.items():
            if parameter is not None:
                state[prefix + name] = parameter.detach()
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                state[prefix + name] = buffer.detach()
    return state


def _adopt_replaced_modules(model, base) -> list[str]:
    """Put into `model` (built on the meta device) the base modules that a quantizer replaced by its own (quanto's
    `QLinear` for an `nn.Linear`), which a state dict cannot rebuild; returns their names."""
    adopted = []
    for name, module in list(model.named_modules()):
        if not name or not type(module).__module__.startswith("torch.nn."):
            continue
        try:
            base_module = base.get_submodule(name)
        except AttributeError:
            continue  # an inserted module
        if type(base_module) is not type(module):
            model.set_submodule(name, base_module)
            adopted.append(name)
    return adopted


@contextlib.contextmanager
def _naming_allocation_failures(config, device):
    # torch's allocators raise a RuntimeError (OutOfMemoryError on GPUs) that names no size the user chose.
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        if "alloc" not in str(error).lower() and not isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            raise
        raise ValueError(
            f"The inserted parameters cannot be allocated on {device} ({error}). Choose smaller insertion sizes "
            f"(inserted_hidden_size is {config.inserted_hidden_size}, inserted_intermediate_size "
            f"{config.inserted_intermediate_size})."
        ) from None


def _load_inserted_weights(model, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.otter_state_dict()
    check_inserted_state_dict(expected, state_dict, source)
    with torch.no_grad():
        for name, tensor in state_dict.items():
            expected[name].copy_(tensor)
