"""Turning a base causal LM into an Otter model, and attaching saved inserted weights to a base model."""

import contextlib
import copy
import dataclasses
import difflib
import json
import os

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..modeling import OTTER_CLASSES_BY_BASE_MODEL_TYPE, SUPPORTED_BASE_MODEL_TYPES
from ..modeling.configuration_otter import OtterConfigMixin
from ..modeling.initialization import initialize_inserted_parameters
from ..modeling.persistence import OTTER_CONFIG_NAME, OTTER_WEIGHTS_NAME, base_weights_fingerprint, reading_checkpoint
from ..modeling.quantization import (
    check_supported_quantization,
    quantization_method,
    with_inserted_modules_skipped,
)
from ..modeling.verification import check_inserted_state_dict, verify_inserted_weights
from .hub import otter_files

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


def otter_class_for(base_config) -> type[PreTrainedModel]:
    model_type = getattr(base_config, "model_type", None)
    if isinstance(base_config, OtterConfigMixin):
        raise ValueError(
            f"This model already is an Otter model ({model_type!r}, inserted into "
            f"{base_config.base_model_name_or_path or 'its base model'}); Otter parameters are inserted once. Train "
            "or use it as it is, or insert into its base model."
        )
    if model_type not in OTTER_CLASSES_BY_BASE_MODEL_TYPE:
        raise ValueError(
            f"Otter does not support the {model_type!r} architecture yet; supported base architectures: "
            f"{', '.join(SUPPORTED_BASE_MODEL_TYPES)}."
        )
    return OTTER_CLASSES_BY_BASE_MODEL_TYPE[model_type]


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
    otter_class = otter_class_for(base.config)
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
    otter_class = otter_class_for(base.config)
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
        key: (getattr(saved_config, key, None), getattr(base_config, key, None))
        for key in ARCHITECTURE_KEYS
        if getattr(saved_config, key, None) != getattr(base_config, key, None)
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
                    setattr(module, name, nn.Parameter(torch.empty(parameter.shape, device=base.device, dtype=dtype)))
    if adopted:
        model.base_model.register_capture_hooks()
    model.tie_weights()
    model.freeze_base_parameters()
    model.train(base.training)
    model.generation_config = copy.deepcopy(base.generation_config)
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        # Saved whole, the model then reloads quantized as it is: the base quantized, the inserted modules not.
        model.hf_quantizer = quantizer
        model.config.quantization_config = with_inserted_modules_skipped(quantizer.quantization_config, model)
    return model


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
