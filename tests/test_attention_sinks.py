"""Attention sinks (gpt-oss): the inserted heads hold sinks of their own, copied from their source heads and
trained with the inserted parameters; the base's sinks, and so the original output, stay the base's."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import otter_hf
from otter_hf.modeling.initialization import copied_head_sources
from tests.helpers import make_base, make_otter, random_batch

SINKS_BASE = "gptoss-sinks-sliding"


def test_inserted_heads_copy_the_sinks_of_their_source_heads_and_leave_the_base_ones():
    base = make_base(SINKS_BASE)
    base_sinks = [layer.self_attn.sinks.detach().clone() for layer in base.model.layers]
    otter = otter_hf.insert(base, inserted_num_attention_heads=4, inserted_num_key_value_heads=2)
    query_sources, _ = copied_head_sources(otter.config)
    for layer, original in zip(otter.otter_decoder_layers(), base_sinks):
        assert layer.inserted_attn.sinks.requires_grad and not layer.self_attn.sinks.requires_grad
        assert layer.self_attn.sinks.data_ptr() != layer.inserted_attn.sinks.data_ptr()
        assert torch.equal(layer.self_attn.sinks, original)
        assert torch.equal(layer.inserted_attn.sinks, original[query_sources])


def test_the_inserted_sinks_change_the_signal_and_train_but_never_the_original_output():
    base = make_base(SINKS_BASE)
    otter = make_otter(base)
    input_ids, attention_mask = random_batch(2, 7, "left")
    with torch.no_grad():
        expected = base(input_ids, attention_mask=attention_mask).logits
        before = otter(input_ids, attention_mask=attention_mask)
        for layer in otter.otter_decoder_layers():
            layer.inserted_attn.sinks.add_(3.0)  # a sink that takes most of the attention mass
        after = otter(input_ids, attention_mask=attention_mask)
    assert torch.equal(before.logits, expected) and torch.equal(after.logits, expected)
    assert not torch.allclose(before.value, after.value)

    otter.train()
    otter(input_ids, attention_mask=attention_mask).value.sum().backward()
    for layer in otter.otter_decoder_layers():
        assert layer.inserted_attn.sinks.grad.abs().sum() > 0
        assert layer.self_attn.sinks.grad is None


def test_a_saved_model_keeps_its_inserted_sinks_and_refuses_sdpa(tmp_path):
    otter = make_otter(make_base(SINKS_BASE))
    otter.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for ours, theirs in zip(reloaded.otter_decoder_layers(), otter.otter_decoder_layers()):
        assert torch.equal(ours.inserted_attn.sinks, theirs.inserted_attn.sinks)
    # sdpa has no sinks: transformers runs gpt-oss without it, and so does the Otter model.
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
