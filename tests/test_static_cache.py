"""A static cache holds the inserted heads' keys and values beside the base's, as the dynamic cache does."""

import pytest
import torch
import transformers
from packaging import version
from transformers import StaticCache
from transformers.cache_utils import Cache, DynamicLayer

from otter_hf.modeling.inserted_stream import otter_cache_layers
from tests.helpers import make_base, make_otter, random_batch

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


# transformers 5.19's Llama 4 fails static-cache generation on its own (`create_chunked_causal_mask()` is handed an
# argument it does not take).
BASES_WITHOUT_STATIC_CACHE = ("llama4",) if version.parse(transformers.__version__) < version.parse("5.20") else ()


def test_static_cache_decodes_the_base_tokens(base_name):
    if base_name.startswith(BASES_WITHOUT_STATIC_CACHE):
        pytest.skip(f"transformers {transformers.__version__}'s own {base_name} base fails static-cache generation")
    base = make_base(base_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    expected = base.generate(input_ids, attention_mask=attention_mask, cache_implementation="static", **GREEDY)
    assert torch.equal(expected, base.generate(input_ids, attention_mask=attention_mask, **GREEDY))
    generated = otter.generate(input_ids, attention_mask=attention_mask, cache_implementation="static", **GREEDY)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "gemma3-sliding-softcap", "gemma4-per-layer-shared-kv"])
def test_values_with_a_static_cache_equal_the_uncached_forward(name):
    otter = make_otter(make_base(name))
    input_ids, attention_mask = random_batch(2, 7, padding="left")
    with torch.no_grad():
        uncached = otter(input_ids=input_ids, attention_mask=attention_mask)
        cache = StaticCache(config=otter.config, max_cache_len=12)
        prefill = otter(input_ids[:, :5], attention_mask=attention_mask[:, :5], past_key_values=cache, use_cache=True)
        step = otter(input_ids[:, 5:], attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    assert len(cache.layers) == otter_cache_layers(otter.config)
    # A sliding static layer keeps its window in a ring, so float32 sums run in another order than the full forward's.
    tolerance = dict(rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([prefill.value, step.value], dim=1), uncached.value, **tolerance)
    torch.testing.assert_close(step.logits, uncached.logits[:, 5:], **tolerance)


def test_token_level_guidance_with_a_static_cache_equals_the_dynamic_one():
    otter = make_otter(make_base("llama-gqa-tied"), token_reward_head=True)
    input_ids, attention_mask = random_batch(2, 6, padding="left")
    dynamic = otter.generate(input_ids, attention_mask=attention_mask, token_reward_weight=1.5, **GREEDY)
    static = otter.generate(
        input_ids, attention_mask=attention_mask, token_reward_weight=1.5, cache_implementation="static", **GREEDY
    )
    assert torch.equal(static, dynamic)


def test_caches_that_cannot_hold_the_inserted_keys_are_refused():
    otter = make_otter(make_base("llama-gqa-tied"))
    input_ids, attention_mask = random_batch(1, 5)
    with pytest.raises(ValueError, match="leave `cache_implementation` unset"):
        otter.generate(input_ids, attention_mask=attention_mask, reward_weight=1.0, cache_implementation="static")

    class OtherCache(Cache):
        pass

    other = OtherCache(layers=[DynamicLayer() for _ in range(otter.config.num_hidden_layers)])
    with pytest.raises(ValueError, match="in a DynamicCache or a StaticCache; got OtherCache"), torch.no_grad():
        otter(input_ids, attention_mask=attention_mask, past_key_values=other, use_cache=True)
