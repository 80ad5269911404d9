"""Otter on a quantized base: which quantization methods it runs with, how the inserted modules stay out of the
quantizer's reach, and the float values of a quantized weight.

When transformers loads a base with a `quantization_config`, the quantizer replaces the base's linear layers
(bitsandbytes' `Linear8bitLt` and `Linear4bit`, quanto's `QLinear`) or their weights (torchao's tensor subclasses).
An Otter model runs those modules as they are, so its original output is the quantized base's, bit for bit; the
inserted parameters are plain float parameters, trainable like an adapter's. Loading an Otter model with a
`quantization_config` quantizes the base modules only: otter_hf adds the inserted modules to the quantizer's list
of modules it leaves alone (`with_inserted_modules_skipped`), whatever the user's config lists.

Like the modeling files, this file imports only torch and transformers (a quantization backend is used only when a
tensor of its is met, and so loaded), as it ships next to checkpoints for `trust_remote_code`.
"""

import copy
import sys

import torch
from torch import nn
from transformers.quantizers.auto import AutoQuantizationConfig
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.utils.quantization_config import QuantizationConfigMixin

from .inserted_heads import is_inserted_parameter

# The `quant_method` values of the quantizers an Otter model runs on, as transformers names them.
SUPPORTED_QUANTIZATION_METHODS = ("bitsandbytes", "quanto", "torchao")


def quantization_method(quantization_config) -> str | None:
    """The `quant_method` of a quantization config (object or dict), as a string; None without one."""
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return getattr(method, "value", method)


def check_supported_quantization(quantization_config) -> None:
    """Raise a ValueError naming the quantization method when Otter does not run on bases it quantizes."""
    method = quantization_method(quantization_config)
    if method is None or method in SUPPORTED_QUANTIZATION_METHODS:
        return
    raise ValueError(
        f"The base is quantized with {method!r}, which otter_hf does not support: an Otter model runs on bases "
        f"quantized with {', '.join(SUPPORTED_QUANTIZATION_METHODS)} (`BitsAndBytesConfig`, `QuantoConfig`, "
        "`TorchAoConfig`). Load the base unquantized, or quantize it with one of those."
    )


def inserted_module_names(model: nn.Module) -> list[str]:
    """The full names of the outermost inserted modules of `model` (`model.layers.0.inserted_attn`, `v_head`)."""
    names = [name for name, _ in model.named_modules() if name and is_inserted_parameter(name)]
    return [name for name in names if not is_inserted_parameter(name.rpartition(".")[0])]


def with_inserted_modules_skipped(quantization_config, model: nn.Module) -> QuantizationConfigMixin:
    """A copy of `quantization_config` whose modules left unquantized include every inserted module of `model` (an
    Otter model, possibly on the meta device), and, where the config lists none, the ones transformers would leave
    out by default (the LM head)."""
    check_supported_quantization(quantization_config)
    if isinstance(quantization_config, dict):
        quantization_config = AutoQuantizationConfig.from_dict(quantization_config)
    else:
        quantization_config = copy.deepcopy(quantization_config)
    # bitsandbytes names its list differently.
    field = (
        "llm_int8_skip_modules" if hasattr(quantization_config, "llm_int8_skip_modules") else "modules_to_not_convert"
    )
    skipped = getattr(quantization_config, field, None)
    skipped = list(get_keys_to_not_convert(model) if skipped is None else skipped)
    skipped += [name for name in inserted_module_names(model) if name not in skipped]
    setattr(quantization_config, field, skipped)
    return quantization_config


# The packages whose tensor subclasses hold quantized weights.
_QUANTIZED_TENSOR_PACKAGES = ("bitsandbytes", "optimum", "torchao")


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds quantized values: a tensor subclass of a quantization backend."""
    return type(tensor).__module__.split(".")[0] in _QUANTIZED_TENSOR_PACKAGES


def dequantized(tensor: torch.Tensor, owner: nn.Module | None = None) -> torch.Tensor:
    """The values of `tensor` as a float tensor of its logical shape: `tensor` itself unless it is quantized.

    `owner` is the module holding `tensor`: a bitsandbytes 8-bit layer keeps the scales of its weight there once it
    has run a forward.
    """
    if not is_quantized_tensor(tensor):
        return tensor
    kind = type(tensor).__name__
    if kind in ("Int8Params", "Params4bit"):
        # Loaded, as its tensor exists; not imported by name, which would make transformers require the package
        # wherever this file runs as a checkpoint's remote code.
        bnb = sys.modules["bitsandbytes"]
        if kind == "Params4bit":
            if getattr(tensor.quant_state, "packing_format_for_cpu", False):
                raise ValueError(
                    "This bitsandbytes 4-bit weight was repacked for bitsandbytes' CPU kernels by a forward on the "
                    "CPU, and its values cannot be read back exactly from that layout. Insert into the base before "
                    "running it on the CPU, or run bitsandbytes 4-bit on a GPU, where weights keep their layout."
                )
            return bnb.functional.dequantize_4bit(tensor.data, tensor.quant_state)
        scales = tensor.SCB if tensor.SCB is not None else owner.state.SCB
        return bnb.functional.int8_vectorwise_dequant(tensor.data, scales)
    # torchao's and quanto's tensor subclasses.
    return tensor.dequantize()


def owner_of(tensor: torch.Tensor, module: nn.Module) -> nn.Module | None:
    """The submodule of `module` that holds `tensor` as a parameter."""
    return next((owner for owner in module.modules() if any(p is tensor for p in owner.parameters(False))), None)
