"""Loading an Otter model from a path of either kind, a full checkpoint or inserted parameters alone, with errors
that name a damaged weight file."""

import contextlib
import os

from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..modeling.derived_layout import derived_architecture_of
from .insertion import check_model_path, load_otter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_model(path: str, otter_only: bool):
    """The Otter model at `path` (a folder or a Hub id): a full checkpoint, or with `otter_only` (or a folder without
    `config.json`) inserted parameters alone, attached to the base model they name."""
    check_model_path(path)
    with reading_weights_of(path):
        if otter_only or (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))):
            return load_otter(None, path)
        # A checkpoint of a derived layout names its classes by the base's model_type: make and register them.
        model_type = PreTrainedConfig.get_config_dict(path)[0].get("model_type")
        if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
            derived_architecture_of(model_type)
        return AutoModelForCausalLM.from_pretrained(path)


@contextlib.contextmanager
def reading_weights_of(path: str):
    """Turn safetensors' error on a damaged weight file, which names no file, into one naming it and the fix."""
    try:
        yield
    except SafetensorError as error:
        damaged = first_damaged_safetensors_file(path) or path
        raise ValueError(
            f"{damaged} cannot be read ({error}): it is truncated or damaged. Save or download the model again."
        ) from None


def first_damaged_safetensors_file(folder: str) -> str | None:
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            try:
                safe_open(path, "pt")  # checks that the header is whole and describes the whole file
            except SafetensorError:
                return path
    return None


def has_tokenizer(path: str) -> bool:
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)
    return True  # a Hub repository: transformers resolves it
