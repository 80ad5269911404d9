"""Checks that keep an Otter model whole: what a load attaches, what a save writes, what `generate()` is given.

A load or save that would leave inserted weights missing, unexpected, of another shape or dtype, or non-finite
fails with an error naming them, rather than running on uninitialised memory or NaN. Every load runs the same
check, `check_inserted_state_dict`: `from_pretrained` (and so the sequence-classification view) first on the
safetensors headers, before the model is built, so that a few-KB crafted config allocates nothing it names, and
`load_otter` on the tensors it attaches. The generation checks run before any forward, so a bad argument fails
with one clear ValueError instead of deep inside a kernel, or not at all (a NaN weight silently decodes pad
tokens).

Like the modeling files, this file imports only torch, transformers, safetensors and its siblings, as it ships next
to checkpoints for `trust_remote_code`.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

from .configuration_otter import OtterConfigMixin
from .guidance_weight import check_guidance_weight
from .inserted_heads import is_inserted_parameter
from .persistence import reading_checkpoint

logger = logging.get_logger(__name__)

# Config fields that decide which inserted tensors a checkpoint holds, and of which shapes, or which base they fit.
WEIGHT_DEFINING_CONFIG_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    *(field.name for field in dataclasses.fields(OtterConfigMixin) if field.name != "base_model_name_or_path"),
)


def _names(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite_inserted_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], action: str) -> None:
    """Raise a ValueError naming the inserted tensors holding NaN or infinity; `action` says what is refused."""
    non_finite = [
        name
        for name, tensor in named_tensors
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all())
    ]
    if non_finite:
        raise ValueError(
            f"Refusing to {action}: the inserted weights {_names(non_finite)} hold NaN or infinite values. Training "
            "diverged; train again with a lower learning rate (and check the labels for NaN or infinity)."
        )


def check_weights_in_memory(model: torch.nn.Module, action: str) -> None:
    """Raise a ValueError naming the modules of `model` whose weights are on the meta device: offloaded to disk or
    CPU by a `device_map` (accelerate keeps them outside the model and loads them per forward), or never loaded.

    An Otter model reads its base weights outside the base modules' forwards (the fingerprint, copy-initialisation,
    the capture hooks that run after accelerate has offloaded a module again), so offloaded weights would be read as
    empty tensors; `action` says what is refused."""
    offloaded = {name.rpartition(".")[0] or name for name, tensor in model.named_parameters() if tensor.is_meta}
    if not offloaded:
        return
    device_map = getattr(model, "hf_device_map", None) or {}
    # Named as the device map names them (`model.layers.1`), else by the modules holding the weights.
    offloaded_blocks = [
        block or "the whole model"
        for block in device_map
        if any(block == "" or name == block or name.startswith(f"{block}.") for name in offloaded)
    ]
    where = _names(offloaded_blocks or offloaded, limit=4)
    raise ValueError(
        f"Cannot {action}: the weights of {where} are not in memory (on the meta device: offloaded to disk or CPU by "
        "a `device_map`, or never loaded), and an Otter model reads its base weights outside the forwards that "
        'accelerate\'s offloading hooks wrap. Load it with every weight on a device: `device_map` "auto" with '
        "`max_memory` room for the whole model (several GPUs split it layer by layer), or an explicit map without "
        '"disk" (and without "cpu" beside GPUs), or no `device_map`.'
    )


def check_inserted_state_dict(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming the inserted tensors of `loaded` that are missing, unexpected, of another shape or
    dtype than the model's (`expected`), or non-finite."""
    missing, unexpected = expected.keys() - loaded.keys(), loaded.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    shared = sorted(expected.keys() & loaded.keys())
    wrong_shapes = [
        f"{name} {tuple(loaded[name].shape)} vs {tuple(expected[name].shape)}"
        for name in shared
        if loaded[name].shape != expected[name].shape
    ]
    if wrong_shapes:
        problems.append(f"saved shapes differ from the model's for {_names(wrong_shapes)}")
    wrong_dtypes = [
        f"{name} {loaded[name].dtype} vs {expected[name].dtype}"
        for name in shared
        # Floating point tensors are cast on load, as transformers does; integer ones (token ids) must match.
        if loaded[name].is_floating_point() != expected[name].is_floating_point()
    ]
    if wrong_dtypes:
        problems.append(f"saved dtypes cannot be cast to the model's for {_names(wrong_dtypes)}")
    if problems:
        raise ValueError(
            f"The inserted weights in {source} do not fit this model: {'; '.join(problems)}. They were saved from "
            "another Otter configuration, or the file is incomplete; save them again from the trained model."
        )
    check_finite_inserted_weights(loaded.items(), f"load {source}")


def verify_inserted_weights(
    model_class,
    config,
    loaded: dict[str, torch.Tensor],
    source: str,
    newly_inserted: Callable[[str], bool] = lambda name: False,
) -> None:
    """Raise a ValueError unless `loaded` (tensors, or meta tensors standing for a file's header) holds exactly the
    inserted tensors a `model_class` of `config` has (but those `newly_inserted` names, which it is not expected to
    hold), of their shapes and dtypes, finite, and the original tensors it shares with the model in their shapes.
    The model is built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    inserted = [name for name in model.otter_state_dict() if not newly_inserted(name)]
    check_inserted_state_dict(
        {name: expected[name] for name in inserted},
        {name: tensor for name, tensor in loaded.items() if is_inserted_parameter(name)},
        source,
    )
    wrong_shapes = [
        f"{name} {tuple(tensor.shape)} vs {tuple(expected[name].shape)}"
        for name, tensor in loaded.items()
        if name in expected and name not in inserted and tensor.shape != expected[name].shape
    ]
    if wrong_shapes:
        raise ValueError(
            f"The weights in {source} do not fit their config: the shapes of {_names(wrong_shapes)} differ from the "
            "ones config.json gives. The config belongs to another checkpoint, or was edited; save the model again."
        )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors_headers(folder: str, variant: str | None = None) -> dict[str, torch.Tensor] | None:
    """The tensors of the safetensors weights in `folder` (one file, or the shards its index names) as meta tensors
    of their saved shapes and dtypes, read from the files' headers without loading any tensor; None when the folder
    holds no safetensors weights.

    A folder holding transformers' pickled weights (`pytorch_model.bin`) alone is refused: otter_hf loads
    safetensors only.
    """
    infix = f".{variant}" if variant else ""
    single = os.path.join(folder, SAFE_WEIGHTS_NAME.replace(".safetensors", f"{infix}.safetensors"))
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME.replace(".json", f"{infix}.json"))
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        files = _shards_of(index, folder)
    else:
        pickled = [name for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) if os.path.isfile(os.path.join(folder, name))]
        if pickled:
            raise ValueError(
                f"{folder} holds its weights as a pickle ({pickled[0]}) and no model.safetensors: otter_hf loads "
                "safetensors only, never a pickle (unpickling can run any code the file names). Convert the weights "
                "where you trust them (`model.save_pretrained(folder)` writes safetensors) and load the folder again."
            )
        return None
    header = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as file:
                names = file.keys()
                for name in names:
                    saved = file.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(saved.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{path} stores {name} as {saved.get_dtype()}, which no Otter model holds.")
                    header[name] = torch.empty(saved.get_shape(), dtype=dtype, device="meta")
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} cannot be read ({error}): it is truncated or damaged. Save or download the model again."
            ) from None
    return header


def _shards_of(index: str, folder: str) -> list[str]:
    try:
        with open(index, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise ValueError(f"{index} is not a safetensors index (no `weight_map` of tensor -> file).") from None
    outside = [
        name for name in names if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..")
    ]
    if outside:
        raise ValueError(f"{index} names {outside[0]!r} as a shard, which is not a file of {folder}.")
    return [os.path.join(folder, name) for name in names]


def load_verified(
    model_class, load: Callable, path, *args, newly_inserted: Callable[[str], bool] = lambda name: False, **kwargs
):
    """`PreTrainedModel.from_pretrained` for an Otter checkpoint (`load`, of `model_class`), reading one whole save
    and verifying the inserted weights it attaches.

    The folder is read under its shared lock (`persistence.reading_checkpoint`). transformers reads the config
    before this runs (AutoConfig); when a save committed in between, the config is read again, under the lock, so
    that config and weights come from the same save. Before the model is built, the safetensors headers of a local
    folder are compared with what the config implies (`verify_inserted_weights`). Inserted tensors the checkpoint
    lacks, which transformers would fill by `_init_weights` or leave uninitialised, unexpected inserted tensors,
    inserted tensors of another shape or of a dtype that is not cast (integer, bool) and non-finite inserted
    weights raise a ValueError naming them, except those `newly_inserted` names: inserted parameters the
    checkpoint is not expected to hold (it is the base model's), which transformers reports as missing.
    """
    if path is None:
        return load(path, *args, **kwargs)
    output_loading_info = kwargs.pop("output_loading_info", False)
    with reading_checkpoint(path, kwargs.get("subfolder")):
        _reread_config_of_an_earlier_save(path, kwargs)
        _verify_headers_before_loading(model_class, path, kwargs, newly_inserted)
        model, loading_info = load(path, *args, output_loading_info=True, **kwargs)
    check_weights_in_memory(model, f"load {path} with this `device_map`")
    is_inserted = model.otter_state_dict().keys()
    missing = [name for name in loading_info["missing_keys"] if name in is_inserted and not newly_inserted(name)]
    unexpected = [name for name in loading_info["unexpected_keys"] if is_inserted_parameter(name)]
    if missing or unexpected:
        details = "; ".join(
            f"{what} {_names(names)}" for what, names in (("missing", missing), ("unexpected", unexpected)) if names
        )
        raise ValueError(
            f"The checkpoint {path} does not hold the inserted weights this model needs ({details}); without them "
            "the model would run on freshly initialised or uninitialised values. Save it again from the trained "
            "model, or check that its config.json belongs to its weights."
        )
    check_finite_inserted_weights(model.otter_state_dict().items(), f"load {path}")
    return (model, loading_info) if output_loading_info else model


def _verify_headers_before_loading(model_class, path, kwargs: dict, newly_inserted: Callable[[str], bool]) -> None:
    folder = os.path.join(os.fspath(path), kwargs["subfolder"]) if kwargs.get("subfolder") else os.fspath(path)
    if not os.path.isdir(folder) or kwargs.get("gguf_file") or kwargs.get("state_dict") is not None:
        return  # a Hub id (its files are fetched by transformers), or weights that are not this folder's safetensors
    if getattr(model_class, "checkpoint_names_are_renamed", False):
        return  # transformers renames its weights as it loads them; they are checked by what it reports after
    config = kwargs.get("config")
    if not isinstance(config, OtterConfigMixin):
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            return  # transformers says what is missing
        overrides = {key: kwargs[key] for key in WEIGHT_DEFINING_CONFIG_FIELDS if key in kwargs}
        config = model_class.config_class.from_pretrained(folder, **overrides)
    header = read_safetensors_headers(folder, kwargs.get("variant"))
    if header is not None and getattr(config, "quantization_config", None) is not None:
        # A quantized base is stored in its quantizer's layout (packed 4-bit weights, scales), which transformers'
        # quantizer checks; the inserted tensors are float, checked here.
        header = {name: tensor for name, tensor in header.items() if is_inserted_parameter(name)}
    prefix = f"{model_class.base_model_prefix}."
    if header and not any(name.startswith(prefix) for name in header):
        # A save of the backbone alone: transformers loads it under the prefix, and so it is compared.
        header = {prefix + name: tensor for name, tensor in header.items()}
    if header is not None:  # without weights at all, transformers says so
        verify_inserted_weights(model_class, config, header, folder, newly_inserted)


def _reread_config_of_an_earlier_save(path, kwargs: dict) -> None:
    config = kwargs.get("config")
    config_path = os.path.join(path, kwargs.get("subfolder") or "", CONFIG_NAME)
    if not isinstance(config, OtterConfigMixin) or not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as file:
        saved = json.load(file)
    if saved.get("model_type") != config.model_type:
        return  # another architecture altogether: the weights' shapes will not fit, and transformers says so
    on_disk = type(config).from_dict(saved)
    changed = [
        key for key in WEIGHT_DEFINING_CONFIG_FIELDS if getattr(on_disk, key, None) != getattr(config, key, None)
    ]
    if changed:
        logger.warning(
            f"{path} was saved again after its config was read ({', '.join(changed)} changed); loading the config of "
            "the new save with its weights."
        )
        kwargs["config"] = on_disk


# -- generate() arguments --------------------------------------------------------------------------------------


def check_generation_arguments(model, inputs, kwargs: dict, reward_weight, token_reward_weight, reward_top_k) -> None:
    """Validate `generate()`'s guidance arguments and inputs against each other and the model, before any forward.

    `inputs` and `kwargs` are the other arguments of `generate()`: the token ids (`inputs`, or `input_ids`) and
    `attention_mask` are checked.
    """
    check_guidance_weight("reward_weight", reward_weight)
    check_guidance_weight("token_reward_weight", token_reward_weight)
    vocab_size = model.config.vocab_size
    if reward_top_k is not None and (
        isinstance(reward_top_k, bool) or not isinstance(reward_top_k, int) or not 1 <= reward_top_k <= vocab_size
    ):
        raise ValueError(
            f"`reward_top_k` must be an integer from 1 to the vocabulary size {vocab_size}, got {reward_top_k!r}."
        )
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    attention_mask = kwargs.get("attention_mask")
    if not isinstance(input_ids, torch.Tensor):
        return  # inputs_embeds, or nothing: generate() checks these itself
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
    if input_ids.numel() == 0:
        raise ValueError(
            f"`input_ids` is empty (shape {tuple(input_ids.shape)}): give at least one prompt token per row, e.g. "
            "the BOS token."
        )
    if input_ids.is_floating_point():
        raise ValueError(f"`input_ids` must hold integer token ids, got {input_ids.dtype}.")
    out_of_vocabulary = (input_ids < 0) | (input_ids >= vocab_size)
    if out_of_vocabulary.any():
        first = input_ids[out_of_vocabulary][0].item()
        raise ValueError(
            f"`input_ids` holds token id {first}, outside this model's vocabulary (0 to {vocab_size - 1}): the "
            "tokenizer belongs to another model."
        )
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = (
            tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        )
        raise ValueError(
            f"`attention_mask` must have the shape of `input_ids`, {tuple(input_ids.shape)}, got {shape}; it is not "
            "broadcast over the batch."
        )
    empty_rows = (~attention_mask.bool().any(dim=-1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(
            f"Rows {empty_rows} of `attention_mask` are all padding: every prompt needs at least one real token."
        )
