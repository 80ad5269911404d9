"""Hybrid bases (Gated DeltaNet linear-attention layers mixed with full attention: Qwen3.5, Qwen3.5-MoE,
Qwen3-Next): inserted heads only in the full-attention layers, a readout of the linear attention's output and the
inserted MLP in the others, inserted keys and values cached for the full layers beside the base's recurrent
states, through generate()'s crops and reorders."""

import pytest
import torch
import transformers
from transformers import DynamicCache, DynamicLayer

from otter_hf.modeling.inserted_layer import OtterInsertedAttention, OtterLinearAttentionReadout
from otter_hf.modeling.inserted_stream import inserted_cache_layer_indices
from otter_hf.trainers import OtterRewardConfig, OtterRewardTrainer
from tests.helpers import BASE_MODELS, conversational_pairs, make_base, make_otter, random_batch, trainer_config
from tests.test_remote_code import expected_outputs, load_without_otter_hf

HYBRID_BASES = sorted(
    name for name, (_, _, sizes) in BASE_MODELS.items() if "linear_attention" in sizes.get("layer_types", ())
)
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


@pytest.fixture(params=HYBRID_BASES)
def hybrid_name(request):
    return request.param


def test_linear_attention_layers_get_a_readout_and_the_inserted_mlp_but_no_heads(hybrid_name):
    otter = make_otter(make_base(hybrid_name))
    layer_types = otter.config.layer_types
    assert {"linear_attention", "full_attention"} <= set(layer_types)
    linear_layers = [index for index, kind in enumerate(layer_types) if kind == "linear_attention"]
    for index, layer in enumerate(otter.otter_decoder_layers()):
        linear = index in linear_layers
        assert isinstance(layer.inserted_attn, OtterLinearAttentionReadout if linear else OtterInsertedAttention)
        # Nothing reads the attention norm of a linear layer: it holds no inserted weight to leave untrained.
        assert hasattr(layer.input_layernorm, "inserted_weight") != linear
    # A linear layer adds to the inserted stream its readout of the linear attention's output and its MLP's update:
    # with both zeroed it leaves the inserted stream as it found it.
    backbone, entering, leaving = otter.base_model, {}, {}
    for index, layer in enumerate(otter.otter_decoder_layers()):
        # Registered after Otter's own hooks: they see the inserted stream before and after the inserted layer.
        layer.register_forward_pre_hook(
            lambda module, args, index=index: entering.update({index: backbone._inserted_stream.hidden})
        )
        layer.register_forward_hook(
            lambda module, args, output, index=index: leaving.update({index: backbone._inserted_stream.hidden})
        )
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        otter(input_ids, attention_mask=attention_mask)
        assert not any(torch.equal(leaving[index], entering[index]) for index in range(len(layer_types)))
        for index in linear_layers:
            layer = otter.otter_decoder_layers()[index]
            layer.inserted_attn.o_proj.weight.zero_()
            layer.inserted_mlp.down_proj.weight.zero_()
        otter(input_ids, attention_mask=attention_mask)
    for index in range(len(layer_types)):
        assert torch.equal(leaving[index], entering[index]) == (index in linear_layers)


def test_the_cache_holds_inserted_keys_for_the_full_layers_beside_the_base_recurrent_states(hybrid_name):
    base = make_base(hybrid_name)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        base_cache = base(input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
        cache = otter(input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
    num_layers = otter.config.num_hidden_layers
    inserted = inserted_cache_layer_indices(otter.config)
    full_layers = [index for index, kind in enumerate(otter.config.layer_types) if kind == "full_attention"]
    assert list(inserted) == full_layers and list(inserted.values()) == list(range(num_layers, len(cache.layers)))
    assert [type(layer) for layer in cache.layers[:num_layers]] == [type(layer) for layer in base_cache.layers]
    for index, (layer, base_layer) in enumerate(zip(cache.layers, base_cache.layers)):
        if index in full_layers:
            assert torch.equal(layer.keys, base_layer.keys) and torch.equal(layer.values, base_layer.values)
        else:  # the recurrent and convolution states are the base's, untouched
            assert torch.equal(layer.recurrent_states[0], base_layer.recurrent_states[0])
            assert torch.equal(layer.conv_states[0], base_layer.conv_states[0])
    assert all(type(cache.layers[index]) is DynamicLayer for index in inserted.values())


def test_beam_search_with_token_guidance_decodes_the_same_cached_and_uncached(hybrid_name):
    # Beam search reorders the cache every step: the base's recurrent states and the inserted keys alike. A weight
    # large enough to change the beams makes a reorder that missed the inserted layers change the tokens.
    base = make_base(hybrid_name)
    otter = make_otter(base, noise=0.5, token_reward_head=True)
    input_ids, attention_mask = random_batch(2, 6, "left")
    beams = dict(attention_mask=attention_mask, num_beams=2, num_return_sequences=2, **GREEDY)
    cached = otter.generate(input_ids, token_reward_weight=3.0, **beams)
    assert torch.equal(cached, otter.generate(input_ids, token_reward_weight=3.0, use_cache=False, **beams))
    assert not torch.equal(cached, base.generate(input_ids, **beams))
    assert torch.equal(otter.generate(input_ids, **beams), base.generate(input_ids, **beams))


# The base Qwen3-Next's own full-attention keys after assisted decoding differ from a fresh forward's (by 1.6e-2 on
# the tiny config, transformers 5.25; its recurrent states agree), so there is no reference to compare the inserted
# ones to.
@pytest.mark.parametrize("hybrid_name", [name for name in HYBRID_BASES if not name.startswith("qwen3next")])
def test_assisted_decoding_crops_the_inserted_keys_with_the_recurrent_states(hybrid_name, monkeypatch):
    # Prompt-lookup decoding drafts tokens and crops the rejected ones away; transformers records the recurrent
    # states' past to crop them. Afterwards the inserted keys and values are those of a fresh forward.
    crops, crop = [], DynamicCache.crop

    def counted_crop(cache, tokens_to_remove):
        crops.append(tokens_to_remove)
        return crop(cache, tokens_to_remove)

    monkeypatch.setattr(DynamicCache, "crop", counted_crop)
    base = make_base(hybrid_name)
    if getattr(base, "_is_stateful", False):
        pytest.skip(
            f"transformers {transformers.__version__} refuses assisted generation to hybrids, the base included"
        )
    otter = make_otter(base)
    prompt, _ = random_batch(1, 8)
    prompt = torch.cat([prompt, prompt[:, :4]], dim=-1)  # a repeated stretch for the prompt lookup to draft from
    settings = dict(
        attention_mask=torch.ones_like(prompt), prompt_lookup_num_tokens=3, max_new_tokens=8, min_new_tokens=8
    )
    output = otter.generate(prompt, return_dict_in_generate=True, do_sample=False, **settings)
    assert torch.equal(output.sequences, base.generate(prompt, do_sample=False, **settings))
    assert crops, "prompt-lookup decoding cropped nothing: the test does not exercise a crop"
    cache = output.past_key_values
    cached_length = int(cache.get_seq_length())
    with torch.no_grad():
        fresh = otter(output.sequences[:, :cached_length], use_cache=True).past_key_values
    for inserted_layer in inserted_cache_layer_indices(otter.config).values():
        torch.testing.assert_close(cache.layers[inserted_layer].keys, fresh.layers[inserted_layer].keys)
        torch.testing.assert_close(cache.layers[inserted_layer].values, fresh.layers[inserted_layer].values)


def test_candidate_guidance_is_refused_naming_the_linear_attention_layers(hybrid_name):
    otter = make_otter(make_base(hybrid_name))
    input_ids, attention_mask = random_batch(1, 5)
    with pytest.raises(ValueError, match="linear-attention layers .*token_reward_weight"):
        otter.generate(input_ids, attention_mask=attention_mask, reward_weight=1.0, **GREEDY)


def test_a_trained_hybrid_guides_decoding_and_reloads_without_otter_hf(tmp_path, tiny_tokenizer):
    base = make_base("qwen3_5-linear-full")
    input_ids, attention_mask = random_batch(2, 10, "right")
    with torch.no_grad():
        original_logits = base(input_ids, attention_mask=attention_mask).logits
    torch.manual_seed(0)
    otter = make_otter(base, noise=0.0, token_reward_head=True)
    pairs = conversational_pairs(8)
    trainer = OtterRewardTrainer(
        otter,
        args=trainer_config(OtterRewardConfig, tmp_path, max_steps=12),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    assert trainer.evaluate()["eval_accuracy"] == 1.0
    with torch.no_grad():
        assert torch.equal(otter(input_ids, attention_mask=attention_mask).logits, original_logits)

    # The token-level reward head untrained scores every token alike; random rows make guidance change the tokens.
    with torch.no_grad():
        otter.token_reward_head.proj.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    otter.eval()
    prompt_ids, prompt_mask = random_batch(2, 7, "left")
    guided = otter.generate(prompt_ids, attention_mask=prompt_mask, token_reward_weight=2.0, **GREEDY)
    assert not torch.equal(guided, base.generate(prompt_ids, attention_mask=prompt_mask, **GREEDY))

    otter.save_pretrained(tmp_path / "saved")
    # Token-level guided decoding is among the expected outputs; the reload must repeat it in the checkpoint's code.
    expected_outputs(otter, tmp_path / "expected.safetensors")
    report = load_without_otter_hf({str(tmp_path / "saved"): str(tmp_path / "expected.safetensors")}, tmp_path)
    assert report["otter_hf_imported"] is False
    result = report[str(tmp_path / "saved")]
    assert result["causal_lm_class"].endswith("otter_qwen3_5.OtterQwen3_5ForCausalLMWithValueHead")
    assert result["logits_equal"] and result["value_close"] and result["guided_equal"]
    assert result["sequence_scores_shape"] == [2, 1]
