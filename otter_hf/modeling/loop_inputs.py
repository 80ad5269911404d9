"""What `generate()` hands a custom decoding loop, taken apart the same way by every Otter loop."""

import dataclasses

import torch

from .inserted_stream import CACHE_ARGUMENT_NAMES


def pop_cache(model_kwargs: dict):
    """Take the cache generate() prepared out of its model kwargs, under either name (`cache` from transformers 5.25
    on, `past_key_values` before; None where there is none)."""
    caches = [model_kwargs.pop(name) for name in CACHE_ARGUMENT_NAMES if name in model_kwargs]
    return next((cache for cache in caches if cache is not None), None)


def cache_field(output_class) -> str:
    """The name an output dataclass of this transformers gives its cache field."""
    names = {field.name for field in dataclasses.fields(output_class)}
    return next(name for name in CACHE_ARGUMENT_NAMES if name in names)


def padding_position_ids(padding_mask: torch.Tensor) -> torch.LongTensor:
    """Position ids as generate() derives them from a 2D padding mask (left padding sits at position 0)."""
    position_ids = padding_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(~padding_mask, 0)


def pop_prepared_inputs(
    input_ids: torch.LongTensor, model_kwargs: dict, decoding_name: str
) -> tuple[torch.Tensor | None, torch.Tensor, torch.LongTensor]:
    """Take the attention mask (as given, and as a boolean padding mask) and the position ids out of generate()'s
    model kwargs, dropping the inputs it prepares for its own loops, and refuse any other model input the loop
    cannot honour."""
    attention_mask = model_kwargs.pop("attention_mask", None)
    position_ids = model_kwargs.pop("position_ids", None)
    for prepared in ("use_cache", "logits_to_keep"):
        model_kwargs.pop(prepared, None)
    unsupported = sorted(name for name, value in model_kwargs.items() if value is not None)
    if unsupported:
        raise ValueError(f"{decoding_name} does not take these model inputs: {unsupported}.")
    padding_mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if position_ids is None:
        position_ids = padding_position_ids(padding_mask)
    return attention_mask, padding_mask, position_ids
