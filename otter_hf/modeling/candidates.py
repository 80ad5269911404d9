"""Scoring the top-k candidate tokens of a decoding step in one forward that shares the cached prefix.

Each candidate is one extra query token at the same position: it attends to the (unpadded) prefix and to
itself, never to the other candidates. A custom 4D attention mask says exactly that; transformers uses a 4D
mask as given, so the architecture's own forward runs unchanged.
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from .inserted_stream import recurrent_cache_layers

# Attention implementations that take an additive float 4D mask as it is.
SUPPORTED_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def check_guidance_model(model, top_k: int) -> None:
    """Raise a clear error when `model` cannot score candidates with its in-model reward."""
    config = model.config
    if getattr(config, "inserted_hidden_size", None) is None or not hasattr(model, "v_head"):
        raise TypeError(
            f"Reward-guided decoding needs an Otter model with a value head; got {type(model).__name__}. "
            "Build one with `otter_hf.insert(base_model)` or load a saved Otter checkpoint."
        )
    if not model.otter_enabled:
        raise ValueError("The inserted stream is switched off (`otter_disabled()`); reward guidance needs it on.")
    if config._attn_implementation not in SUPPORTED_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"Scoring candidates needs a custom 4D attention mask, which attn_implementation="
            f"{config._attn_implementation!r} does not take; load the model with attn_implementation='sdpa' or 'eager'."
        )
    if not isinstance(top_k, int) or not 1 <= top_k <= config.vocab_size:
        raise ValueError(
            f"`top_k` must be an integer between 1 and the vocabulary size ({config.vocab_size}), got {top_k!r}."
        )


def check_candidates_can_share_the_prefix(config) -> None:
    """Refuse to score candidates on a hybrid base: its linear-attention layers' recurrent state would run the
    candidates one after another, where the 4D mask lets each see only the prefix and itself."""
    recurrent_layers = recurrent_cache_layers(config)
    if recurrent_layers:
        raise ValueError(
            f"Reward-guided decoding (`reward_weight`, ARGS) scores the top-k candidates as extra tokens that share "
            f"the cached prefix through a 4D attention mask; {recurrent_layers} layers of this {config.model_type} "
            "model are linear-attention layers (Gated DeltaNet), whose recurrent state would run the candidates one "
            "after another. Guide with the token-level reward head instead (`token_reward_weight`, one forward per "
            "step), or decode without guidance."
        )


def check_within_sliding_window(config, total_length: int) -> None:
    """Candidates are scored against an untruncated cache, so sliding-window layers must not slide yet.

    Within the window a sliding layer attends like a full one; beyond it the sliding cache would drop prefix
    entries while the candidates are appended.
    """
    _, layer_kwargs = get_layer_types_and_kwargs(config)
    windows = [kwargs["sliding_window"] for kwargs in layer_kwargs if kwargs.get("sliding_window") is not None]
    if windows and total_length >= min(windows):
        raise ValueError(
            f"Reward-guided decoding would reach {total_length} tokens (prompt, new tokens and top-k candidates), "
            f"beyond this model's sliding window of {min(windows)}; generate fewer tokens or lower the top-k."
        )


def check_candidates_attend_by_position(config) -> None:
    """Candidates scored in one forward sit at the same position but at different indices of the forward's tokens;
    a base that scales its queries by that index (Llama 4's attention temperature tuning in its layers without
    rotary embeddings) would give each candidate another temperature than a forward of its own."""
    no_rope_layers = getattr(config, "no_rope_layers", None) or []
    if getattr(config, "attn_temperature_tuning", False) and 0 in no_rope_layers:
        raise ValueError(
            f"Reward-guided decoding scores its top-k candidates in one forward, but this {config.model_type} model "
            "scales its queries by their index in the forward (`attn_temperature_tuning` in its layers without "
            "rotary embeddings), so the candidates would not be scored as the tokens they stand for. Use "
            "`token_reward_weight` guidance (one forward per token) or set `attn_temperature_tuning=False`."
        )


def candidate_attention_mask(
    padding_mask: torch.Tensor, num_new_tokens: int, num_candidates: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive 4D mask for `num_new_tokens` ordinary tokens followed by `num_candidates` candidates.

    Args:
        padding_mask: bool `(batch, past + num_new_tokens)`, False on padding; the cache holds the first `past`.
        num_new_tokens: tokens appended to the prefix causally, before the candidates.
        num_candidates: candidate tokens, each seeing the whole prefix and itself.
        dtype: the dtype of the attention scores (the model's dtype).

    Returns:
        `(batch, 1, num_new_tokens + num_candidates, past + num_new_tokens + num_candidates)`, 0 where a query
        may attend and the dtype's minimum elsewhere.
    """
    batch_size, prefix_length = padding_mask.shape
    past_length = prefix_length - num_new_tokens
    num_queries = num_new_tokens + num_candidates
    device = padding_mask.device

    allowed = torch.zeros(batch_size, num_queries, prefix_length + num_candidates, dtype=torch.bool, device=device)
    new_positions = torch.arange(past_length, prefix_length, device=device)
    causal = torch.arange(prefix_length, device=device)[None, :] <= new_positions[:, None]
    allowed[:, :num_new_tokens, :prefix_length] = causal[None] & padding_mask[:, None, :]
    allowed[:, num_new_tokens:, :prefix_length] = padding_mask[:, None, :]
    # Every query sees itself: a candidate's only extra key, and a padding token never attends to nothing.
    query_keys = torch.arange(past_length, prefix_length + num_candidates, device=device)
    allowed[:, torch.arange(num_queries, device=device), query_keys] = True

    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def score_candidates(
    model,
    tokens: torch.LongTensor,
    attention_mask: torch.Tensor,
    position_ids: torch.LongTensor,
    cache: DynamicCache,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Otter decoder on `tokens` over `cache` and return the original stream's final hidden states
    and the in-model value at every token, without the LM head (callers apply it to what they keep)."""
    hidden_states, inserted_hidden, _ = model.final_streams(
        input_ids=tokens,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    return hidden_states, model.v_head(inserted_hidden)
