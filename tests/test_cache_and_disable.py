"""Inserted keys and values live in the generate() cache; `otter_disabled()` runs the base model alone."""

import pytest
import torch
from transformers import DynamicCache

from otter_hf.modeling.inserted_stream import inserted_cache_layer_indices, otter_cache_layers
from tests.helpers import BASE_MODELS, make_base, make_otter, random_batch


def test_inserted_heads_have_their_own_cache_layers(base_name):
    otter = make_otter(make_base(base_name))
    input_ids, attention_mask = random_batch(2, 9)
    with torch.no_grad():
        cache = otter(input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
    # One inserted layer per layer with inserted heads: every layer but a hybrid's linear-attention ones.
    inserted_layers = inserted_cache_layer_indices(otter.config)
    # The base cache's own layers first (transformers 5.19 gives Gemma 4's KV-sharing layers none).
    assert len(cache.layers) == otter_cache_layers(otter.config)
    assert len(inserted_layers) > 0
    for layer, inserted_layer in inserted_layers.items():
        inserted_keys = cache.layers[inserted_layer].keys
        assert inserted_keys.shape[1] == otter.config.inserted_num_key_value_heads
        assert inserted_keys.shape[2] == cache.layers[layer].keys.shape[2]


# Sliding-window caches (and chunked ones, which cache as sliding ones) cannot be cropped, nor linear-attention
# states outside generate()'s assisted decoding (tests/test_linear_attention.py crops those).
@pytest.mark.parametrize(
    "base_name",
    [
        name
        for name, (_, _, sizes) in BASE_MODELS.items()
        if not {"sliding_window", "attention_chunk_size"} & set(sizes)
        and "linear_attention" not in sizes.get("layer_types", ())
    ],
)
def test_cropping_the_cache_crops_the_inserted_heads(base_name):
    base = make_base(base_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(1, 12)
    with torch.no_grad():
        full = otter(input_ids, attention_mask=attention_mask)
        cache = DynamicCache(config=otter.config)
        # Prefill a wrong continuation, crop it away, then continue with the real tokens.
        wrong = input_ids.clone()
        wrong[:, 6:] = (wrong[:, 6:] + 7) % otter.config.vocab_size
        otter(wrong, past_key_values=cache, use_cache=True)
        cache.crop(-6)
        assert [layer.get_seq_length() for layer in cache.layers] == [6] * len(cache.layers)
        resumed = otter(input_ids[:, 6:], past_key_values=cache, use_cache=True)
        base_cache = DynamicCache(config=base.config)
        base(wrong, past_key_values=base_cache, use_cache=True)
        base_cache.crop(-6)
        base_resumed = base(input_ids[:, 6:], past_key_values=base_cache, use_cache=True)
    assert torch.equal(resumed.logits, base_resumed.logits)
    torch.testing.assert_close(resumed.value, full.value[:, 6:], atol=1e-5, rtol=1e-4)


def test_sliding_window_caches_keep_only_the_window():
    otter = make_otter(make_base("mistral-sliding"))
    input_ids, attention_mask = random_batch(1, 10)
    with torch.no_grad():
        cache = otter(input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
    window = otter.config.sliding_window
    num_layers = otter.config.num_hidden_layers
    assert cache.layers[num_layers].keys.shape[2] == cache.layers[0].keys.shape[2] <= window


def test_otter_disabled_runs_the_base_model_only(base_name):
    base = make_base(base_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 8, "left")
    inserted_calls = []
    for layer in otter.otter_decoder_layers():
        layer.inserted_attn.register_forward_hook(lambda *args: inserted_calls.append("attn"))
        layer.inserted_mlp.register_forward_hook(lambda *args: inserted_calls.append("mlp"))
    with torch.no_grad():
        expected = base(input_ids, attention_mask=attention_mask, use_cache=True)
        with otter.otter_disabled():
            output = otter(input_ids, attention_mask=attention_mask, use_cache=True)
        assert inserted_calls == []
        assert output.value is None
        assert torch.equal(output.logits, expected.logits)
        assert len(output.past_key_values.layers) == len(expected.past_key_values.layers)  # no inserted layers
        # Leaving the context switches the inserted stream back on.
        assert otter(input_ids, attention_mask=attention_mask).value is not None
    assert inserted_calls


def test_otter_disabled_generate_matches_base():
    base = make_base("llama-gqa-tied")
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 5, "left")
    settings = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with otter.otter_disabled():
        generated = otter.generate(input_ids, **settings)
    assert torch.equal(generated, base.generate(input_ids, **settings))
